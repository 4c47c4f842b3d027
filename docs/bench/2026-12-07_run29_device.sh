#!/usr/bin/env bash
# Run 29's device calls (one H100; docs/benchmarks.md, run 29). `q_base/` is the tree before run 29 (commit
# 971de30: `git archive 971de30 dit tools scripts configs pyproject.toml | tar -x -C q_base`), carried beside this
# one so that both trainers run on the same machine. Neither change these modes test was kept: apply
# docs/bench/2026-12-07_run29_allpairs.patch (call 1) or _fc2pair.patch (call 3) to 971de30 to rerun the overlap,
# _norm_in_step.patch for `norm` (calls 4-5 ran its tests, then 80-step trainer runs with --skip 40 for lack of time).
#   bash docs/bench/2026-12-07_run29_device.sh gpu      # GPU tests: the overlapped weight gradients; run 28's and
#                                                       # 971de30's paths (fused attention, MLP epilogues) (~3 min)
#   bash docs/bench/2026-12-07_run29_device.sh ab [1 2] # DiT-XL/2 trainer: before, after (per round; one round:
#                                                       # also after without the overlap) (~4-6 min)
#   bash docs/bench/2026-12-07_run29_device.sh gpu2     # the overlap's GPU tests only (~1 min)
#   bash docs/bench/2026-12-07_run29_device.sh small    # DiT-S/2 trainer, reduce-overhead (runs 18/20's setting)
#                                                       # and default, before / after (~6 min)
#   bash docs/bench/2026-12-07_run29_device.sh profile  # DiT-XL/2 trainer after run 29, profiled (~2 min)
#   bash docs/bench/2026-12-07_run29_device.sh norm     # the gradient norm from the optimizer kernel: GPU tests,
#                                                       # DiT-XL/2 trainer before / after (~5 min)
source "$(dirname "$0")/device_env.sh"
case "$1" in
gpu)
    timeout 400 python3 -m pytest -q -rA -p no:cacheprovider tests/test_overlap.py tests/test_attention_kernels.py \
        tests/test_cublaslt.py -k "gpu" > "$OUT/gpu_tests.txt" 2>&1
    echo "pytest exit $?" >> "$OUT/gpu_tests.txt"
    grep "^\(PASSED\|FAILED\|ERROR\|SKIPPED\|pytest exit\)" "$OUT/gpu_tests.txt" ;;
ab)  # call 1 ran this with every block GEMM pair overlapped (commit e982a04); call 3 with fc2's only, in 2 rounds
    for i in ${2:-1}; do
        bench q_base "xl_base$i" DiT-XL/2 100 50
        bench . "xl_new$i" DiT-XL/2 100 50
    done
    [ "${2:-1}" = 1 ] && bench . xl_new_nooverlap DiT-XL/2 100 50 model.overlap_weight_grads=false ;;
gpu2)  # the overlap's own GPU tests only
    timeout 200 python3 -m pytest -q -rA -p no:cacheprovider tests/test_overlap.py -k "gpu" > "$OUT/gpu_tests2.txt" 2>&1
    echo "pytest exit $?" >> "$OUT/gpu_tests2.txt"
    grep "^\(PASSED\|FAILED\|ERROR\|SKIPPED\|pytest exit\)" "$OUT/gpu_tests2.txt" ;;
small)
    bench q_base s_base_ro DiT-S/2 200 60 model.compile_mode=reduce-overhead
    bench . s_new_ro DiT-S/2 200 60 model.compile_mode=reduce-overhead
    bench . s_new_ro_nooverlap DiT-S/2 200 60 model.compile_mode=reduce-overhead model.overlap_weight_grads=false
    bench . s_new DiT-S/2 200 60 ;;
profile)
    bench . xl_new_profile DiT-XL/2 80 40 --profile 5 ;;
norm)  # call 4: the gradient norm from the optimizer kernel's pass (kept code); its GPU tests, then the trainer
    timeout 150 python3 -m pytest -q -rA -p no:cacheprovider tests/test_optim.py tests/test_train.py \
        -k "gpu or clip_in_the_fused_step" > "$OUT/gpu_tests_norm.txt" 2>&1
    echo "pytest exit $?" >> "$OUT/gpu_tests_norm.txt"
    grep "^\(PASSED\|FAILED\|ERROR\|pytest exit\)" "$OUT/gpu_tests_norm.txt"
    bench q_base xl_base_norm DiT-XL/2 100 50
    bench . xl_norm DiT-XL/2 100 50 ;;
*) echo "usage: $0 gpu|gpu2|ab [rounds]|small|profile|norm" >&2; exit 2 ;;
esac
