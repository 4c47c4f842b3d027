#!/usr/bin/env bash
# One-time set-up: a virtual environment in .venv with the package (editable) and its test/text extras.
# Safe to re-run: an existing .venv is reused and only missing packages are installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# pip picks the newest torch that has a matching torchvision (timm needs torchvision).
python -m pip install -q -e ".[dev,text]"
python -c "import torch, torchvision, diffusers, timm; print(f'[setup] torch {torch.__version__}, torchvision {torchvision.__version__}, diffusers {diffusers.__version__}, timm {timm.__version__}')"
