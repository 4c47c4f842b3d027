#!/usr/bin/env bash
# FP8 sampling (tools/sample.py --fp8) against full precision on a trained checkpoint of the bundled shapes data:
# the network's relative output error by timestep (fp8 and bf16 against fp32), then 960 samples each way with the
# same seeds, scored by the shapes classifier (conditional accuracy, FD-shapes). CPU is enough for the demo model.
#   bash scripts/fp8_quality.sh [CKPT] [OUT_DIR]     # default: train the demo model first (~5 min on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${2:-outputs/fp8_quality}
mkdir -p "$OUT"
bash scripts/setup.sh
. .venv/bin/activate
CKPT=${1:-}
if [ -z "$CKPT" ]; then
  python tools/train.py --config configs/demo.yaml --out-dir "$OUT/demo" --resume auto
  CKPT="$OUT/demo/checkpoints/latest"
fi
RES=$(python -c "from dit.sample import load_sampling_setup as l; print(l('$CKPT').image_size)")
[ -f "$OUT/classifier.pt" ] || python tools/train_classifier.py --resolution "$RES" --out "$OUT/classifier.pt"
python - "$CKPT" <<'PY'
import copy, sys
import torch
from dit.diffusion import create_diffusion
from dit.sample import default_labels, float8_for_sampling, load_sampling_setup, sample_images

setup = load_sampling_setup(sys.argv[1], device="cpu")
labels = (default_labels(setup) or [0]) * 4
x0 = torch.from_numpy(sample_images(setup, labels=labels, seed=0)).permute(0, 3, 1, 2).float() / 127.5 - 1
y = {"y": torch.tensor(labels)} if setup.conditioning == "class" else {}
diffusion = create_diffusion(timestep_respacing="", **setup.diffusion_kwargs)
fp8 = copy.copy(setup)
fp8.model = copy.deepcopy(setup.model)
float8_for_sampling(fp8, torch.device("cpu"), precision="fp32")
g = torch.Generator().manual_seed(1)
print("relative output error against fp32 (x_t = q_sample of the model's own samples):")
for t in (10, 100, 300, 500, 700, 900, 990):
    tt = torch.full((len(labels),), t)
    xt = diffusion.q_sample(x0, tt, noise=torch.randn(x0.shape, generator=g))
    with torch.no_grad():
        ref = setup.model(xt, tt, **y)
        e8 = fp8.model(xt, tt, **y)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            eb = setup.model(xt, tt, **y).float()
    rel = lambda a: ((a - ref).norm() / ref.norm()).item()  # noqa: E731
    print(f"  t={t:4d}: fp8 {rel(e8):.2e}  bf16 {rel(eb):.2e}")
PY
for mode in fp32 fp8; do
  extra=""
  [ "$mode" = fp8 ] && extra="--fp8"
  rm -rf "$OUT/$mode.npz" "$OUT/$mode.npz.parts"
  python tools/sample.py --ckpt "$CKPT" --num-samples 960 --npz "$OUT/$mode.npz" --batch-size 96 --device cpu \
      --seed 0 $extra
done
python - "$OUT" <<'PY'
import sys
import numpy as np
from dit.eval.shapes_eval import evaluate_shapes_npz

out = sys.argv[1]
for m in ("fp32", "fp8"):
    r = evaluate_shapes_npz(f"{out}/{m}.npz", f"{out}/classifier.pt")
    print(f"{m}: conditional accuracy {r['accuracy']:.3f}, FD-shapes {r['fd_shapes']:.1f} ({r['num_samples']} samples)")
a, b = (np.load(f"{out}/{m}.npz")["arr_0"].astype(int) for m in ("fp32", "fp8"))
print(f"mean |pixel difference| fp8 vs fp32, same seeds: {np.abs(a - b).mean():.2f} (uint8 levels)")
PY
