#!/usr/bin/env bash
# Run 30's device calls (one H100; docs/benchmarks.md, run 30). `q_base/` is the tree before run 30 (commit
# 0392898: `git archive 0392898 dit tools scripts configs pyproject.toml | tar -x -C q_base`), carried beside this
# one so that both trainers run on the same machine.
#   bash docs/bench/2026-12-07_run30_device.sh norm    # call 1: the norm's GPU tests, DiT-XL/2 before / after, twice
#   bash docs/bench/2026-12-07_run30_device.sh check   # call 2: the optimizer's and trainer's GPU and CUDA-graph
#                                                      # tests; DiT-XL/2 with the step graph; DiT-S/2 before / after
#   bash docs/bench/2026-12-07_run30_device.sh host    # call 3: DiT-S/2 on call 2's slow host: reduce-overhead, the
#                                                      # step graph, neither
#   bash docs/bench/2026-12-07_run30_device.sh final   # call 4: the step graph as the compiled default: the
#                                                      # trainer's GPU tests; DiT-XL/2 and DiT-S/2 before / after
source "$(dirname "$0")/device_env.sh"
case "$1" in
norm)
    gputests norm 150 tests/test_optim.py tests/test_train.py -k "gpu or clip_in_the_fused_step"
    bench q_base xl_base_norm DiT-XL/2 100 50
    bench . xl_norm DiT-XL/2 100 50
    bench q_base xl_base_norm2 DiT-XL/2 100 50
    bench . xl_norm2 DiT-XL/2 100 50 ;;
check)
    gputests check 300 tests/test_optim.py tests/test_train.py tests/test_dit_model.py -k "gpu or cuda_graph or fused_step"
    bench . xl_graph DiT-XL/2 80 40 train.cuda_graph=true
    bench q_base s_base DiT-S/2 200 60
    bench . s_new DiT-S/2 200 60 ;;
host)
    nproc; grep -m1 "model name" /proc/cpuinfo
    bench . s_new_ro DiT-S/2 200 60 model.compile_mode=reduce-overhead
    bench . s_new_graph DiT-S/2 200 60 train.cuda_graph=true
    bench . s_new2 DiT-S/2 200 60 ;;
final)
    nproc; grep -m1 "model name" /proc/cpuinfo
    gputests final 200 tests/test_train.py -k "gpu or cuda_graph or fused_step"
    bench q_base s_base DiT-S/2 200 60
    bench . s_new DiT-S/2 200 60
    bench q_base xl_base DiT-XL/2 100 50
    bench . xl_new DiT-XL/2 100 50 ;;
*) echo "usage: $0 norm|check|host|final" >&2; exit 2 ;;
esac
