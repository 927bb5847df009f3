#!/usr/bin/env bash
# Runs the test suite in .venv (created first when missing). Extra arguments go to pytest,
# e.g. `bash scripts/test.sh -m slow` or `bash scripts/test.sh -m gpu`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
