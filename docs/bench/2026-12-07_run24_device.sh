#!/usr/bin/env bash
# Run 24's device calls: fp16 autocast (train.mixed_precision=fp16) in the trainer's fast path, one H100.
#   bash docs/bench/2026-12-07_run24_device.sh tests     # GPU tests of the fp16 paths, then the numerics (harness)
#   bash docs/bench/2026-12-07_run24_device.sh trainer   # trainer img/s, bf16 against fp16, same machine
#   bash docs/bench/2026-12-07_run24_device.sh all       # the essentials of both in one call
source "$(dirname "$0")/device_env.sh"
case "$1" in
tests)
    timeout 260 python3 -m pytest -q -rfE -p no:cacheprovider tests/test_train.py tests/test_attention_kernels.py \
        tests/test_cublaslt.py -k "cuda_graph_step or fp16 or gradients_through or training_gradients" 2>&1 \
        | tail -15 | tee "$OUT/gpu_tests.txt"
    # The output's error against fp32 (same randomised weights), plain autocast and the fast forward paths.
    for amp in bf16 fp16; do
        timeout 150 python3 tools/benchmark.py --models UNet-S,UNet-B,DiT-S/2,DiT-XL/2 --variants eager-bf16 \
            --fwd-only --iters 3 --warmup 1 --amp-dtype $amp --json "$OUT/numerics_eager_$amp.json" \
            --out "$OUT/numerics_eager_$amp.md" --plot /tmp/n.png 2>&1 | grep "^\[bench\] [UD]"
    done
    for amp in bf16 fp16; do  # the residual stream in the autocast dtype (fp16: 3 more mantissa bits than bf16)
        timeout 120 python3 tools/benchmark.py --models DiT-XL/2 --variants fast-bf16r --fwd-only --iters 5 \
            --warmup 2 --amp-dtype $amp --json "$OUT/numerics_lpr_$amp.json" --out "$OUT/numerics_lpr_$amp.md" \
            --plot /tmp/n.png 2>&1 | grep "^\[bench\] [UD]"
    done ;;
trainer)
    U="--models UNet-S --steps 300 --skip 60 model.compile=true train.cudnn_benchmark=true train.cuda_graph=true"
    X="--models DiT-XL/2 --steps 160 --skip 50"
    # 200 s: on run 24's cold machine (empty Triton/Inductor caches, cuDNN's search) UNet-S logged nothing in 105 s
    timeout 205 python3 tools/bench_trainer.py $U --json "$OUT/trainer_unet_s_bf16.json" --timeout 200 | grep "^\[trainer\]"
    timeout 205 python3 tools/bench_trainer.py $U train.mixed_precision=fp16 --json "$OUT/trainer_unet_s_fp16.json" --timeout 200 | grep "^\[trainer\]"
    timeout 140 python3 tools/bench_trainer.py $X model.compile_mode=reduce-overhead --json "$OUT/trainer_xl_bf16.json" --timeout 135 | grep "^\[trainer\].*img/s"
    timeout 140 python3 tools/bench_trainer.py $X train.cuda_graph=true train.mixed_precision=fp16 model.low_precision_residual=true --json "$OUT/trainer_xl_fp16_lpr.json" --timeout 135 | grep "^\[trainer\]" ;;
all)  # one call of about 7 minutes, most important first (machines were scarce on 2026-12-07)
    timeout 170 python3 -m pytest -q -rfE -p no:cacheprovider tests/test_train.py tests/test_attention_kernels.py \
        tests/test_norm_kernels.py -k "cuda_graph_step or fp16 or unet_gradients or gradients_through_fused or on_the_gpu" \
        2>&1 | tail -8 | tee "$OUT/gpu_tests.txt"
    U="--models UNet-S --steps 240 --skip 60 model.compile=true train.cudnn_benchmark=true train.cuda_graph=true"
    timeout 110 python3 tools/bench_trainer.py $U --json "$OUT/trainer_unet_s_bf16.json" --timeout 105 | grep "^\[trainer\].*img/s"
    timeout 110 python3 tools/bench_trainer.py $U train.mixed_precision=fp16 --json "$OUT/trainer_unet_s_fp16.json" --timeout 105 | grep "^\[trainer\].*img/s"
    for amp in bf16 fp16; do
        timeout 60 python3 tools/benchmark.py --models UNet-S,UNet-B,DiT-XL/2 --variants eager-bf16 --fwd-only \
            --iters 2 --warmup 1 --amp-dtype $amp --json "$OUT/numerics_eager_$amp.json" \
            --out "$OUT/numerics_eager_$amp.md" --plot /tmp/n.png 2>&1 | grep "^\[bench\] [UD]"
    done
    ;;
*) echo "usage: $0 tests|trainer|all" >&2; exit 2 ;;
esac
