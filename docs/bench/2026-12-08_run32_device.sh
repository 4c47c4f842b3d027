#!/usr/bin/env bash
# Run 32's device calls (one H100; docs/benchmarks.md, run 32): the epilogue GEMMs' algorithm tuner made steady
# (warm-up, interleaved rounds, each candidate's best round), and the update in the backward capped at k thread blocks
# (train.update_in_backward_ctas).
#   bash docs/bench/2026-12-08_run32_device.sh tuner    # the probe, the GPU tests, DiT-XL/2 compiled whole and regionally +
#                                                       # update in the backward, each profiled
#   bash docs/bench/2026-12-08_run32_device.sh short    # what about four minutes of device time hold: the probe, the
#                                                       # tuner's GPU tests, DiT-XL/2's default profiled
#   bash docs/bench/2026-12-08_run32_device.sh next     # the next session's call (about 8 min): the probe, the kernels'
#                                                       # GPU tests, the default, then the update in the backward
#                                                       # uncapped and capped at 32 / 16 / 64 thread blocks per launch,
#                                                       # then the trainer's GPU tests of it (capped too)
source "$(dirname "$0")/device_env.sh"
case "$1" in
tuner)
    python3 scripts/probe_gemm_choice.py --trials 6 2>&1 | tee "$OUT/probe_gemm_choice.txt"
    gputests tuner 90 tests/test_cublaslt.py
    bench . xl_loss DiT-XL/2 80 50 --profile 3
    bench . xl_blocks_ub DiT-XL/2 80 50 model.compile_scope=blocks train.update_in_backward=true --profile 3 ;;
short)
    python3 scripts/probe_gemm_choice.py --trials 4 2>&1 | tee "$OUT/probe_gemm_choice.txt"
    gputests short 60 tests/test_cublaslt.py -k "algorithm or gpu"
    bench . xl_loss DiT-XL/2 70 40 --profile 3 ;;
next)
    python3 scripts/probe_gemm_choice.py --trials 4 2>&1 | tee "$OUT/probe_gemm_choice.txt"
    gputests next_kernels 60 tests/test_cublaslt.py tests/test_optim.py -k "algorithm or gpu"
    bench . xl_loss DiT-XL/2 70 40 --profile 3
    bench . xl_ub DiT-XL/2 70 40 model.compile_scope=blocks train.update_in_backward=true
    for c in 32 16 64; do
        bench . "xl_ub_c$c" DiT-XL/2 70 40 model.compile_scope=blocks train.update_in_backward=true train.update_in_backward_ctas=$c
    done
    gputests next_trainer 120 tests/test_train.py -k "update_in_backward" ;;
*) echo "usage: $0 tuner|short|next" >&2; exit 2 ;;
esac
