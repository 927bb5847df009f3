#!/usr/bin/env bash
# Sets up .venv (when needed) and runs the main job on embedded defaults: the untrained embedded
# device model (SmolLM2-135M-Instruct) on held-out prompts of the arithmetic task, device-only vs
# cloud-only (simulated cloud), with a report in outputs/main/report/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m agents.evaluate name=main evaluate.num_prompts=250 \
    'evaluate.methods=[device_only,device_with_help,cloud_only]' "$@"
