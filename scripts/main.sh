#!/usr/bin/env bash
# Sets up .venv (when needed) and runs the main job on embedded defaults, on both tasks:
#   1. experiment=arithmetic_cpu: the tiny-arith device on arithmetic (difficulty visible on the question);
#   2. experiment=hidden_cpu: the tiny-reason device, which writes its steps before it answers or calls,
#      on running_total (difficulty hidden in the computation; docs/hidden_difficulty.md).
# Each builds its device model on first use (minutes), trains GAPG and the baselines that need training
# against the simulated cloud, and compares every method on held-out prompts at the 30% cloud budget.
# Reports: outputs/arithmetic_cpu/report/report.md and outputs/hidden_cpu/report/report.md (+ PNG plots).
# Rerunning resumes unfinished runs and reuses finished ones; extra arguments are Hydra overrides
# applied to both experiments.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m agents.evaluate experiment=arithmetic_cpu "$@"
.venv/bin/python -m agents.evaluate experiment=hidden_cpu "$@"
