#!/usr/bin/env bash
# The main job on the embedded default: set up, train a tiny DiT on the bundled shapes data (CPU or GPU), then
# sample a grid from its EMA weights: one row per class (12 rows), 8 samples each. Ends with outputs/demo/samples.png.
#   bash scripts/demo.sh [key=value ...]     # extra arguments are config overrides for tools/train.py
# Re-running continues (or, when finished, just re-samples) the run in outputs/demo; delete it to start over.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${DEMO_OUT:-outputs/demo}  # where the run and the grid go
bash scripts/setup.sh
. .venv/bin/activate
python tools/train.py --config configs/demo.yaml --out-dir "$OUT" --resume auto "$@"
# Row c = class c of the 12 bundled classes (blue circle, blue cross, ..., red triangle), 8 columns of samples;
# sampler, steps and guidance scale come from the checkpoint's `sample` config (configs/demo.yaml).
LABELS=$(python -c "print(','.join(str(c) for c in range(12) for _ in range(8)))")
python tools/sample.py --ckpt "$OUT/checkpoints/latest" --class-labels "$LABELS" --nrow 8 --out "$OUT/samples.png"
echo "[demo] sample grid (rows: blue circle, blue cross, blue square, blue triangle, green ..., red ...): $OUT/samples.png"
