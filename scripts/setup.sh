#!/usr/bin/env bash
# Creates .venv/ at the repository root and installs DeviceCloud with everything it needs.
# torch is pinned to 2.13.0 (the CPU wheel these machines carry) in every pip command, so no other
# package can pull in a multi-GB CUDA build. Reruns are instant while pyproject.toml is unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "DeviceCloud needs Python 3.11 or newer; set PYTHON=/path/to/python3.11" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv with $("$PYTHON" --version)"
    "$PYTHON" -m venv .venv
fi

stamp=.venv/.devicecloud-installed
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    echo "[setup] installing torch==2.13.0 and DeviceCloud into .venv (about 10 minutes the first time)"
    .venv/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
    .venv/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0 -e ".[all]"
    echo "$want" > "$stamp"
fi
