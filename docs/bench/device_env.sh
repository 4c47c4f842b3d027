# Sourced by the docs/bench/*_device.sh scripts: strict pipes, $OUT (the device tool's output folder; /tmp/out
# elsewhere), unbuffered Python, and the GPU, its clock and power limit and the library versions at the top of the log.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cudnn', torch.backends.cudnn.version())"
