#!/usr/bin/env bash
# Sets up .venv (when needed) and runs the main job on embedded defaults (experiment=arithmetic_cpu):
# builds the tiny-arith device model on first use (a few minutes), trains GAPG and the baselines
# that need training against the simulated cloud, and compares every method on held-out arithmetic
# prompts at the 30% cloud budget. Report: outputs/arithmetic_cpu/report/report.md (+ PNG plots).
# Rerunning resumes unfinished runs and reuses finished ones; extra arguments are Hydra overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m agents.evaluate experiment=arithmetic_cpu "$@"
