#!/usr/bin/env bash
# The DiT-vs-UNet study on the bundled shapes data, end to end on one GPU (docs/compare.md):
#   1. TAEF2 latent normalisation measured on the shapes data; 2. TAEF2 latents (+ flips, + caption embeddings);
#   3. the offline shapes classifier; 4. tools/compare.py over MODELS with one budget.
# Usage: bash scripts/gpu_study.sh TAEF2_DIR TEXT_ENCODER OUT_DIR
# Env: MODELS, BUDGET (training images per model), RES (pixels), N (training images), SAMPLES (per model and scale),
#      GPUS (e.g. "0,1": models are dealt round-robin to one compare.py per GPU, then one run over all models writes
#      the report; it trains nothing and reuses their evaluations, since compare.py resumes per model).
set -euo pipefail
TAEF2=${1:?usage: gpu_study.sh TAEF2_DIR TEXT_ENCODER OUT_DIR}
TEXT=${2:-minilm}
OUT=${3:-runs/study}
MODELS=${MODELS:-DiT-S/8,DiT-S/4,DiT-S/2,DiT-B/2,UNet-S,UNet-B,DiT-S/2-T}
BUDGET=${BUDGET:-200000}
RES=${RES:-128}
N=${N:-12000}
SAMPLES=${SAMPLES:-600}
W=$OUT/taef2
. "$(dirname "$0")/taef2_prep.sh"
prepare_taef2 "$TAEF2" "$W" "$RES" 40
python tools/extract_latents.py --data shapes --resolution "$RES" --num-samples "$N" --flip \
    --autoencoder "taef2:$W" --text-encoder "$TEXT" --out "$OUT/latents" --num-workers 12 --batch-size 256
[ -f "$OUT/shapes_classifier.pt" ] || \
  python tools/train_classifier.py --resolution 64 --steps "${CLS_STEPS:-800}" --device "${DEVICE:-cuda}" --out "$OUT/shapes_classifier.pt"
compare() {  # compare() MODELS [extra args...]
  python tools/compare.py --config configs/compare_shapes.yaml --models "$1" --budget-images "$BUDGET" \
      --out "$OUT/compare" --eval-classifier "$OUT/shapes_classifier.pt" --num-samples "$SAMPLES" \
      --text-encoder "$TEXT" data.path="$OUT/latents" autoencoder.spec="taef2:$W" data.resolution="$RES" "${@:2}"
}
if [ -n "${GPUS:-}" ]; then
  IFS=, read -ra gpus <<< "$GPUS"
  IFS=, read -ra models <<< "$MODELS"
  pids=()
  for i in "${!gpus[@]}"; do
    share=""
    for j in "${!models[@]}"; do
      if [ $((j % ${#gpus[@]})) -eq "$i" ]; then share="$share${share:+,}${models[$j]}"; fi
    done
    [ -n "$share" ] || continue
    echo "[gpu_study] GPU ${gpus[$i]}: $share (log: $OUT/compare_gpu${gpus[$i]}.log)"
    CUDA_VISIBLE_DEVICES=${gpus[$i]} compare "$share" "${@:4}" > "$OUT/compare_gpu${gpus[$i]}.log" 2>&1 &
    pids+=($!)
  done
  status=0
  for pid in "${pids[@]}"; do wait "$pid" || status=1; done
  [ "$status" -eq 0 ] || { echo "[gpu_study] a per-GPU run failed: see $OUT/compare_gpu*.log" >&2; exit 1; }
fi
compare "$MODELS" "${@:4}"
