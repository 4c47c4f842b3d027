#!/usr/bin/env bash
# Run 28's device calls (one H100; docs/benchmarks.md, run 28). `q_base/` is the tree before run 28 (commit
# 8109ac7: `git archive 8109ac7 dit tools scripts configs pyproject.toml | tar -x -C q_base`), carried beside this
# one so that both trainers run on the same machine.
#   bash docs/bench/2026-12-07_run28_device.sh adamw    # run 27's kept optimizer-kernel fix on the GPU: each update
#                                                       # against torch's AdamW; the fp16 step test (~2 min)
#   bash docs/bench/2026-12-07_run28_device.sh ab [1 2] # DiT-XL/2 trainer, before / after run 28, per round (~3 min)
#   bash docs/bench/2026-12-07_run28_device.sh gpu      # the GPU gradient tests of the changed paths (~2 min)
#   bash docs/bench/2026-12-07_run28_device.sh kernels  # the LayerNorm kernels with a bias vs float64, timed (~3 min)
#   bash docs/bench/2026-12-07_run28_device.sh profile  # DiT-XL/2 trainer after run 28, profiled (~2 min)
#   bash docs/bench/2026-12-07_run28_device.sh small    # DiT-S/2 trainer, before / after (~4 min)
source "$(dirname "$0")/device_env.sh"
case "$1" in
adamw)
    PYTHONPATH=".:${PYTHONPATH:-}" timeout 150 python3 scripts/check_adamw_ema.py --model DiT-XL/2 --steps 5 2>&1 \
        | grep "^\[adamw_ema\]" | tee "$OUT/check_adamw_ema.txt"
    timeout 100 python3 -m pytest -q -s -p no:cacheprovider tests/test_train.py -k "fp16_in_the_fused" 2>&1 \
        | grep -v "^  " | tail -4 | tee "$OUT/gpu_test_fp16_step.txt"
    ;;
ab)
    for i in ${2:-1 2}; do
        bench q_base "xl_base$i" DiT-XL/2 100 50
        bench . "xl_new$i" DiT-XL/2 100 50
    done ;;
gpu)  # the DiT gradient tests on the paths run 28 changed (the attention's and the MLP's deferred biases)
    timeout 240 python3 -m pytest -q -rA -p no:cacheprovider tests/test_attention_kernels.py tests/test_cublaslt.py \
        -k "gpu_dit_gradients_through_fused_attention or mlp_epilogue_training_gradients" > "$OUT/gpu_tests.txt" 2>&1
    echo "pytest exit $?" >> "$OUT/gpu_tests.txt"
    grep "^\(PASSED\|FAILED\|ERROR\|pytest exit\)" "$OUT/gpu_tests.txt" ;;
kernels)  # the LayerNorm kernels with a bias against float64, and timed
    PYTHONPATH=".:${PYTHONPATH:-}" timeout 240 python3 scripts/check_kernels.py --parts ops,backward 2>&1 \
        | grep "^\[\(check\|bwd\)\]" | grep -v "rows x" | tee "$OUT/check_kernels.txt"
    ;;
profile)
    bench . xl_new_profile DiT-XL/2 80 40 --profile 5 ;;
small)
    bench q_base s_base DiT-S/2 200 60
    bench . s_new DiT-S/2 200 60 ;;
*) echo "usage: $0 adamw|ab [rounds]|gpu|kernels|profile|small" >&2; exit 2 ;;
esac
