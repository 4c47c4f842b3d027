#!/usr/bin/env bash
# Multi-GPU runs on one host (docs/benchmarks.md, "Multi-GPU"): training scaling at 1 and NGPU processes, loss-curve
# agreement at the same global batch, distributed .npz sampling (img/s; every index exactly once; the same images as
# one process) and FSDP vs DDP memory for the largest model.
# Usage: bash scripts/multigpu.sh TAEF2_DIR OUT_DIR
# Env: NGPU (default: all GPUs), MODEL (DiT-B/2), STEPS (150), BATCH (per-GPU batch, 256), RES (256 px -> 32x32x32
#      TAEF2 latents), N (4096 training images), SAMPLES (1024), FSDP_MODEL (DiT-XL/2), FSDP_BATCH (per GPU, 32),
#      FSDP (1 = also run the FSDP comparison).
set -euo pipefail
TAEF2=${1:?usage: multigpu.sh TAEF2_DIR OUT_DIR}
OUT=${2:-runs/multigpu}
NGPU=${NGPU:-$(nvidia-smi -L | wc -l)}
MODEL=${MODEL:-DiT-B/2}
STEPS=${STEPS:-150}
B=${BATCH:-256}
RES=${RES:-256}
N=${N:-4096}
SAMPLES=${SAMPLES:-1024}
W=$OUT/taef2
. "$(dirname "$0")/taef2_prep.sh"
prepare_taef2 "$TAEF2" "$W" "$RES" 20
python tools/extract_latents.py --data shapes --resolution "$RES" --num-samples "$N" --autoencoder "taef2:$W" \
    --out "$OUT/latents" --num-workers 16 --batch-size 256
common=(--config configs/compare_shapes.yaml data.path="$OUT/latents" autoencoder.spec="taef2:$W" data.resolution="$RES"
        data.flip=false train.log_every=10 train.ckpt_every=1000000 sample.grid_size=2 run.progress=false
        run.tensorboard=false)
launch() {  # launch NPROC ARGS...: tools/train.py on NPROC processes, one per GPU
  local n=$1; shift
  if [ "$n" -gt 1 ]; then accelerate launch --multi_gpu --num_processes "$n" tools/train.py "$@"
  else accelerate launch --num_processes 1 tools/train.py "$@"; fi
}
m=("${common[@]}" model.name="$MODEL" train.max_steps="$STEPS")
launch 1 "${m[@]}" train.global_batch_size="$B" run.out_dir="$OUT/n1_b$B"
launch "$NGPU" "${m[@]}" train.global_batch_size="$B" run.out_dir="$OUT/n${NGPU}_b$B"
launch "$NGPU" "${m[@]}" train.global_batch_size=$((B * NGPU)) run.out_dir="$OUT/n${NGPU}_b$((B * NGPU))"
python tools/scaling_report.py --run "1gpu-b$B:1:$OUT/n1_b$B" --run "${NGPU}gpu-b$B:$NGPU:$OUT/n${NGPU}_b$B" \
    --run "${NGPU}gpu-b$((B * NGPU)):$NGPU:$OUT/n${NGPU}_b$((B * NGPU))" \
    --efficiency "1gpu-b$B,${NGPU}gpu-b$((B * NGPU))" --agree "1gpu-b$B,${NGPU}gpu-b$B" \
    --out "$OUT/scaling.md" --plot "$OUT/scaling_loss.png"

# Distributed sampling: the same checkpoint on 1 and NGPU processes; the gather checks every index 0..S-1 exactly once.
for n in 1 "$NGPU"; do
  flags=(--num_processes "$n"); [ "$n" -gt 1 ] && flags=(--multi_gpu "${flags[@]}")
  t0=$(date +%s.%N)
  accelerate launch "${flags[@]}" tools/sample.py --ckpt "$OUT/n1_b$B" --num-samples "$SAMPLES" \
      --npz "$OUT/samples_n$n.npz" --batch-size 128 --sampler ddim --steps 50
  t1=$(date +%s.%N)
  echo "[multigpu] sampling $SAMPLES images on $n process(es): $(python -c "print(f'{$t1 - $t0:.1f}')") s wall" \
      | tee -a "$OUT/sampling.txt"
done
python - "$OUT" "$NGPU" <<'PY' | tee -a "$OUT/sampling.txt"
import sys, numpy as np
out, n = sys.argv[1], sys.argv[2]
a, b = np.load(f"{out}/samples_n1.npz"), np.load(f"{out}/samples_n{n}.npz")
same = a["arr_0"].shape == b["arr_0"].shape and (a["arr_0"] == b["arr_0"]).mean()
print(f"[multigpu] {a['arr_0'].shape[0]} samples; 1 vs {n} processes: labels equal {np.array_equal(a['labels'], b['labels'])}, "
      f"pixels equal {same:.4%}, max |diff| {np.abs(a['arr_0'].astype(int) - b['arr_0'].astype(int)).max()}")
PY

if [ "${FSDP:-1}" = 1 ]; then  # memory per GPU of the largest model: DDP vs FSDP (FULL_SHARD), same per-GPU batch
  f=("${common[@]}" model.name="${FSDP_MODEL:-DiT-XL/2}" train.max_steps=20 sample.grid_size=1
     train.global_batch_size=$((${FSDP_BATCH:-32} * NGPU)))
  launch "$NGPU" "${f[@]}" train.fsdp=false run.out_dir="$OUT/ddp_xl"
  launch "$NGPU" "${f[@]}" train.fsdp=true run.out_dir="$OUT/fsdp_xl"
  python tools/scaling_report.py --run "ddp:$NGPU:$OUT/ddp_xl" --run "fsdp:$NGPU:$OUT/fsdp_xl" \
      --out "$OUT/fsdp.md"
fi
