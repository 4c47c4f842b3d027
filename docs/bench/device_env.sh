# Sourced by the docs/bench/*_device.sh scripts: strict pipes, $OUT (the device tool's output folder; /tmp/out
# elsewhere), unbuffered Python, the GPU, its clock and power limit and the library versions at the top of the log,
# `bench`: one trainer measurement (tools/bench_trainer.py) of a tree, its summary lines tagged, and `gputests`: a
# pytest selection's log in $OUT with its exit status, each test's outcome echoed.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cudnn', torch.backends.cudnn.version())"
bench() {  # tree tag model steps skip [more bench_trainer.py args]: $OUT/trainer_<tag>.json
    local tree=$1 tag=$2 model=$3 steps=$4 skip=$5
    shift 5
    timeout 170 python3 "$tree/tools/bench_trainer.py" --models "$model" --steps "$steps" --skip "$skip" \
        --timeout 165 --json "$OUT/trainer_${tag}.json" "$@" 2>&1 | grep "^\[trainer\] .*\(ms/step\|profile\|FAILED\|stopped\|no logged\)" \
        | sed "s/^/[$tag] /"
}
gputests() {  # name seconds [pytest args]: $OUT/gpu_tests_<name>.txt
    local log="$OUT/gpu_tests_$1.txt" limit=$2
    shift 2
    timeout "$limit" python3 -m pytest -q -rA -p no:cacheprovider "$@" > "$log" 2>&1
    echo "pytest exit $?" >> "$log"
    grep "^\(PASSED\|FAILED\|ERROR\|SKIPPED\|pytest exit\)" "$log"
}
