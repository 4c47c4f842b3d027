#!/usr/bin/env bash
# Run 31's device calls (one H100; docs/benchmarks.md, run 31): the AdamW + EMA update launched during the backward
# on a low-priority stream (train.update_in_backward, dit.optim.UpdateDuringBackward).
#   bash docs/bench/2026-12-07_run31_device.sh overlap   # call 1: the optimizer's and trainer's GPU tests for it and
#                                                        # the step graph; DiT-XL/2 compiled whole (the default),
#                                                        # regionally, regionally with the update in the backward
#   bash docs/bench/2026-12-07_run31_device.sh quick     # the trainer's tests for it; DiT-XL/2 as in overlap, fewer steps
#   bash docs/bench/2026-12-07_run31_device.sh mini      # the same pair, then the regionally compiled case's test
#   bash docs/bench/2026-12-07_run31_device.sh profile   # call 2: where the GPU time goes with and without it
source "$(dirname "$0")/device_env.sh"
case "$1" in
overlap)
    gputests overlap 220 tests/test_optim.py tests/test_train.py -k "gpu or update_in_backward or cuda_graph_step_equals"
    bench . xl_loss DiT-XL/2 100 50
    bench . xl_blocks DiT-XL/2 100 50 model.compile_scope=blocks
    bench . xl_blocks_ub DiT-XL/2 100 50 model.compile_scope=blocks train.update_in_backward=true --profile 3 ;;
quick)  # the same comparison in less device time (machines were scarce this session)
    gputests quick 120 tests/test_train.py -k "update_in_backward"
    bench . xl_blocks DiT-XL/2 70 40 model.compile_scope=blocks
    bench . xl_blocks_ub DiT-XL/2 70 40 model.compile_scope=blocks train.update_in_backward=true
    bench . xl_loss DiT-XL/2 70 40 ;;
mini)  # what four minutes of device time hold: the pair first, then the compiled case's test, then the default
    bench . xl_blocks DiT-XL/2 60 35 model.compile_scope=blocks
    bench . xl_blocks_ub DiT-XL/2 60 35 model.compile_scope=blocks train.update_in_backward=true
    gputests mini 100 tests/test_train.py -k "update_in_backward and (blocks or checked)"
    bench . xl_loss DiT-XL/2 60 35 ;;
profile)
    bench . xl_blocks_prof DiT-XL/2 70 50 model.compile_scope=blocks --profile 3
    bench . xl_blocks_ub_prof DiT-XL/2 70 50 model.compile_scope=blocks train.update_in_backward=true --profile 3
    bench . s_blocks DiT-S/2 200 60 model.compile_scope=blocks
    bench . s_blocks_ub DiT-S/2 200 60 model.compile_scope=blocks train.update_in_backward=true ;;
*) echo "usage: $0 overlap|quick|mini|profile" >&2; exit 2 ;;
esac
