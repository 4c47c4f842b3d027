#!/usr/bin/env bash
# Run 27's device calls (one H100), in the order run (docs/benchmarks.md, run 27); `adamw` ran with the first fix of
# the optimizer kernel's bias corrections: rerun it for the kept one.
#   bash docs/bench/2026-12-07_run27_device.sh check    # the fp16 step test on the GPU with run 26's bound; run 26's
#                                                       # fused-vs-plain probe per step (~2 min)
#   bash docs/bench/2026-12-07_run27_device.sh clocks   # DiT-XL/2 fast-cw, bf16 then fp16, with the SM clock and the
#                                                       # power sampled: is fp16's 1.5% the clock under 700 W? (~5 min)
#   bash docs/bench/2026-12-07_run27_device.sh memsets  # which ops launch the ~280 memsets per DiT-XL/2 step (~3 min)
#   bash docs/bench/2026-12-07_run27_device.sh trainer  # the trainer's DiT-XL/2 step profiled (run.profile_steps): where
#                                                       # its 5 ms over the harness's step go (~3 min)
#   bash docs/bench/2026-12-07_run27_device.sh idle     # after `trainer` (9 ms idle per step): the same with a CUDA
#                                                       # graph (trace kept), and with Python's GC off (~5 min)
#   bash docs/bench/2026-12-07_run27_device.sh adamw    # the AdamW + EMA kernel's update against torch's after the
#                                                       # float64 bias corrections, then `check` (~3 min)
source "$(dirname "$0")/device_env.sh"
case "$1" in
check)
    timeout 100 python3 -m pytest -q -s -p no:cacheprovider tests/test_train.py -k "fp16_in_the_fused" 2>&1 \
        | grep -v "^  " | tail -6 | tee "$OUT/gpu_test_fp16_step.txt"
    timeout 150 python3 docs/bench/2026-12-07_run26_fp16_step_probe.py 2>&1 | grep "^\[probe\]" | tee "$OUT/probe.txt"
    ;;
clocks)
    for amp in bf16 fp16; do
        nvidia-smi --query-gpu=clocks.sm,power.draw --format=csv,noheader,nounits -lms 100 > "$OUT/clocks_$amp.csv" &
        smi=$!
        timeout 240 python3 tools/benchmark.py --models DiT-XL/2 --variants fast-cw --iters 60 --warmup 5 --train-only \
            --amp-dtype $amp --json "$OUT/xl_$amp.json" 2>&1 | grep "^| DiT"
        kill $smi
        # the timed steps draw the most power: the samples above 500 W
        python3 -c "import sys; r=[tuple(map(float, l.split(','))) for l in open(sys.argv[1]) if l.strip()]; \
b=[x for x in r if x[1] > 500]; print(sys.argv[2], len(b), 'busy samples: SM clock', round(sum(x[0] for x in b)/max(len(b),1)), \
'MHz, power', round(sum(x[1] for x in b)/max(len(b),1)), 'W')" "$OUT/clocks_$amp.csv" $amp | tee -a "$OUT/clocks.txt"
    done ;;
memsets)
    for amp in bf16; do
        timeout 280 python3 docs/bench/2026-12-07_run27_memset_probe.py --amp $amp 2>&1 | grep "^\[memsets\]" \
            | tee "$OUT/memsets_$amp.txt"
    done ;;
trainer)
    timeout 200 python3 tools/bench_trainer.py --models DiT-XL/2 --steps 100 --skip 50 --profile 5 \
        --json "$OUT/trainer_xl_profile.json" --timeout 195 | grep "^\[trainer\]"
    ;;
idle)
    bt="python3 tools/bench_trainer.py --models DiT-XL/2 --steps 80 --skip 40 --timeout 150"
    $bt --profile 3 --json "$OUT/trainer_xl_graph.json" train.cuda_graph=true | grep "^\[trainer\]"
    gcoff="$(dirname "$0")/2026-12-07_run27_gcoff"
    PYTHONPATH="$gcoff:${PYTHONPATH:-}" $bt --profile 3 --json "$OUT/trainer_xl_gcoff.json" | grep "^\[trainer\]"
    PYTHONPATH="$gcoff:${PYTHONPATH:-}" $bt --json "$OUT/trainer_xl_graph_gcoff.json" train.cuda_graph=true \
        | grep "^\[trainer\]"
    ;;
adamw)  # after the fix to the kernel's bias corrections (float64): its update against torch's, then `check` again
    PYTHONPATH=".:${PYTHONPATH:-}" timeout 150 python3 scripts/check_adamw_ema.py --model DiT-XL/2 --steps 5 2>&1 | grep "^\[adamw_ema\]" \
        | tee "$OUT/check_adamw_ema.txt"
    bash "$0" check ;;
*) echo "usage: $0 check|clocks|memsets|trainer|idle|adamw" >&2; exit 2 ;;
esac
