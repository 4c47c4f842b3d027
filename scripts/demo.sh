#!/usr/bin/env bash
# The main job on the embedded default: set up, train a tiny DiT on the bundled shapes data (CPU or GPU),
# then sample a grid from its EMA weights. Ends with outputs/demo/samples.png.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python tools/train.py --config configs/demo.yaml "$@"
python tools/sample.py --ckpt outputs/demo/checkpoints/latest --out outputs/demo/samples.png
echo "[demo] sample grid: outputs/demo/samples.png"
