#!/usr/bin/env bash
# Run 22's device calls (one warm H100, in this order; see docs/benchmarks.md "Run 22").
#   bash docs/bench/2026-12-06_run22_device.sh stage     # carry .whl/a: half of the CUDA 13 DSL libraries
#   bash docs/bench/2026-12-06_run22_device.sh install   # carry .whl/b: the rest, FA4 GPU tests, XL: baseline, FA4, all
#   bash docs/bench/2026-12-06_run22_device.sh more      # DiT-S/2 with and without QuACK (not run)
#   bash docs/bench/2026-12-06_run22_device.sh unet      # the UNet-S candidate against UNet-S (not run)
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
XL="--models DiT-XL/2 --steps 200 --skip 50 model.compile_mode=reduce-overhead"
S="--models DiT-S/2 --steps 300 --skip 60 model.compile_mode=reduce-overhead"
patched() {  # a copy of the tree with the dgelu_dbias patch, for A/B runs on one machine
    rm -rf /tmp/p && mkdir /tmp/p && tar --exclude=./outputs --exclude=./.whl -cf - . | tar -xf - -C /tmp/p
    (cd /tmp/p && patch -s -p1 < docs/bench/2026-12-06_run21_dgelu_dbias.patch)
}
case "$1" in
stage)
    mkdir -p outputs/qstage && mv .whl/a/cu13.part00 outputs/qstage/
    nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader
    ;;
install)  # as run in run 22 (the fa4 backend has since been removed): the rest of the stack, FA4's GPU tests, XL A/B
    SP=$(python3 -c 'import site; print(site.getsitepackages()[0])')
    cat outputs/qstage/cu13.part00 .whl/b/cu13.part01 | xz -d | tar xf - -C "$SP"
    python3 -m pip install -q --no-index --no-deps --no-cache-dir .whl/b/*.whl || exit 1
    python3 -c 'import quack, flash_attn.cute.interface; print("quack + fa4 import ok")' || exit 1
    patched
    python3 -m pytest -q -rfE -p no:cacheprovider tests/test_fa4_attention.py 2>&1 | tail -15 | tee "$OUT/tests_fa4.txt"
    python3 tools/bench_trainer.py $XL --json "$OUT/xl_cublas.json" 2>&1 | tail -2
    python3 tools/bench_trainer.py $XL model.attention_backend=fa4 --json "$OUT/xl_fa4.json" 2>&1 | tail -2
    (cd /tmp/p && python3 tools/bench_trainer.py $XL model.gemm_backend=quack model.attention_backend=fa4 --json "$OUT/xl_quack_fa4_dgelu.json" 2>&1 | tail -2)
    ;;
more)  # not run in run 22 (no device time left): DiT-S/2 with and without QuACK, same machine
    python3 tools/bench_trainer.py $S --json "$OUT/s_cublas.json" 2>&1 | tail -2
    python3 tools/bench_trainer.py $S model.gemm_backend=quack --json "$OUT/s_quack.json" 2>&1 | tail -2
    ;;
unet)
    U="model.compile=true train.cudnn_benchmark=true train.cuda_graph=true"
    python3 tools/bench_trainer.py --models UNet-S --steps 300 --skip 60 $U --json "$OUT/unet_s.json" 2>&1 | tail -3
    python3 tools/bench_trainer.py --models UNet-S --steps 300 --skip 60 $U \
        "model.overrides={model_channels: 128, num_res_blocks: 4, channel_mult: [1, 1, 1, 2], attention_resolutions: [2, 4, 8]}" \
        --json "$OUT/unet_s128.json" 2>&1 | tail -3
    ;;
*) echo "usage: $0 stage|install|more|unet" >&2; exit 2 ;;
esac
