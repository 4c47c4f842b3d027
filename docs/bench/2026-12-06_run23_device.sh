#!/usr/bin/env bash
# Run 23's device calls: UNet-S at tensor-core widths against today's UNet-S and DiT-S/2, one warm H100, harness
# (tools/benchmark.py, training step only, kernel profile) as runs 14-16 measured the UNet band.
#   bash docs/bench/2026-12-06_run23_device.sh SECONDS NAME [NAME ...]   # NAME: base c1 c2 c3 dit; each run limited
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T=$1; shift
U="--variants fast-sgclgkfa --iters 10 --warmup 3 --train-only --profile"
for name in "$@"; do
    case "$name" in
    base) args="--models UNet-S $U" ;;
    # 12.02 GFLOP, 41.6 M parameters: 128/128/128/256 channels, 4 blocks per level, attention at 16, 8, 4
    c1) args="--models UNet-S $U" ov="{model_channels: 128, num_res_blocks: 4, channel_mult: [1, 1, 1, 2], attention_resolutions: [2, 4, 8]}" ;;
    # 11.43 GFLOP, 46.8 M: 128/128/256/256, 3 blocks per level, attention at 16, 8, 4
    c2) args="--models UNet-S $U" ov="{model_channels: 128, num_res_blocks: 3, channel_mult: [1, 1, 2, 2], attention_resolutions: [2, 4, 8]}" ;;
    # 11.79 GFLOP, 68.2 M: 128/128/256/384, 3 blocks per level, attention at 8, 4
    c3) args="--models UNet-S $U" ov="{model_channels: 128, num_res_blocks: 3, channel_mult: [1, 1, 2, 3], attention_resolutions: [4, 8]}" ;;
    dit) args="--models DiT-S/2 --variants fast-fa --iters 10 --warmup 3 --train-only --profile" ;;
    *) echo "unknown run $name" >&2; exit 2 ;;
    esac
    extra=()
    [ "$name" != base ] && [ "$name" != dit ] && extra=(--model-overrides "$ov")
    echo "== $name: $(date -u +%T)"
    timeout "$T" python3 tools/benchmark.py $args "${extra[@]}" --json "$OUT/$name.json" --out "$OUT/$name.md" \
        --plot "/tmp/$name.png" 2>&1 | grep -v "^\s*$" | tail -6
    unset ov
done
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
# Third and fourth calls (2026-12-07 00:21 UTC, one warm H100): the GPU tests at the new UNet-S widths, the trainer
# (the UNet's fastest settings, README) for the re-defined UNet-S and for DiT-S/2, and a 256-wide UNet-B candidate:
#   python3 -m pytest -q -rfE -p no:cacheprovider tests/test_norm_kernels.py tests/test_attention_kernels.py tests/test_unet.py -k gpu
#   python3 tools/bench_trainer.py --models UNet-S --steps 300 --skip 60 model.compile=true train.cudnn_benchmark=true train.cuda_graph=true --timeout 300
#   python3 tools/bench_trainer.py --models DiT-S/2 --steps 300 --skip 60 model.compile_mode=reduce-overhead --timeout 110
#   B="--models UNet-B --variants fast-sgclgkfa --iters 10 --warmup 3 --train-only"
#   python3 tools/benchmark.py $B [--model-overrides "{model_channels: 256, num_res_blocks: 3, channel_mult: [1, 1, 2, 2], attention_resolutions: [2, 4, 8]}"]
