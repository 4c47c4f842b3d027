"""GPU timing of one DiT block's training GEMMs (qkv, proj, fc1, fc2: forward, input gradient, weight gradient) in
bf16 and in FP8 with per-tensor and per-row scales (``torch._scaled_mm``), the casts excluded: what each FP8 recipe
of ``dit.models.fp8`` can save at most, before the cost of producing its FP8 operands.

    python scripts/check_fp8_gemms.py --model DiT-XL/2 --batch 64      # CUDA only; seconds on an H100
"""

from __future__ import annotations

import argparse

import torch

from dit.benchmark import time_fn
from dit.models.fp8 import E4M3, E5M2, _col_major, to_float8
from dit.models.registry import model_defaults


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="DiT-XL/2")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--iters", type=int, default=50)
    a = ap.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        ap.error("needs a CUDA GPU with FP8 tensor cores (compute capability 8.9 or newer)")
    dev = torch.device("cuda")
    arch = model_defaults(a.model)  # unknown names: one line listing the valid ones
    d = arch["hidden_size"]
    m = a.batch * (32 // arch["patch_size"]) ** 2  # tokens of 256 px images (32x32 latents)
    shapes = {"qkv": (d, 3 * d), "proj": (d, d), "fc1": (d, 4 * d), "fc2": (4 * d, d)}  # (K, N)
    g = torch.Generator(device=dev).manual_seed(0)
    rows = []
    total = {}
    for name, (k, n) in shapes.items():
        x = torch.randn(m, k, device=dev, generator=g, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=dev, generator=g, dtype=torch.bfloat16) * 0.02
        b = torch.randn(n, device=dev, generator=g, dtype=torch.bfloat16)
        dy = torch.randn(m, n, device=dev, generator=g, dtype=torch.bfloat16)
        x8, sx = to_float8(x, E4M3)
        w8, sw = to_float8(w, E4M3)
        g5, sg = to_float8(dy, E5M2)
        wc8 = _col_major(w8)
        g5t, x8c = g5.t().contiguous(), _col_major(x8)
        xr, sxr = to_float8(x, E4M3, dim=-1)
        wr, swr = to_float8(w, E4M3, dim=-1)
        gr, sgr = to_float8(dy, E4M3, dim=-1)
        wcr, swcr = to_float8(w, E4M3, dim=0)
        wcr = _col_major(wcr)
        bf = torch.bfloat16
        fns = {
            "bf16 fwd": lambda: torch.addmm(b, x, w.t()),
            "bf16 dgrad": lambda: dy @ w,
            "bf16 wgrad": lambda: dy.t() @ x,
            "fp8 tensor fwd": lambda: torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=sw, bias=b, out_dtype=bf),
            "fp8 tensor fwd fast": lambda: torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=sw, bias=b, out_dtype=bf,
                                                            use_fast_accum=True),
            "fp8 tensor dgrad": lambda: torch._scaled_mm(g5, wc8, scale_a=sg, scale_b=sw, out_dtype=bf),
            "fp8 tensor wgrad": lambda: torch._scaled_mm(g5t, x8c, scale_a=sg, scale_b=sx, out_dtype=torch.float32),
            "fp8 row fwd fast": lambda: torch._scaled_mm(xr, wr.t(), scale_a=sxr, scale_b=swr.t(), bias=b,
                                                         out_dtype=bf, use_fast_accum=True),
            "fp8 row fwd": lambda: torch._scaled_mm(xr, wr.t(), scale_a=sxr, scale_b=swr.t(), bias=b, out_dtype=bf),
            "fp8 row dgrad": lambda: torch._scaled_mm(gr, wcr, scale_a=sgr, scale_b=swcr, out_dtype=bf),
        }
        for label, fn in fns.items():
            ms = time_fn(fn, dev, warmup=10, iters=a.iters) * 1e3
            flops = 2 * m * k * n
            rows.append((name, label, ms, flops / ms / 1e9))
            total[label] = total.get(label, 0.0) + ms
    print(f"{a.model}, batch {a.batch} ({m} tokens), {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| GEMM | variant | ms | TFLOP/s |\n|---|---|---:|---:|")
    for name, label, ms, tf in rows:
        print(f"| {name} | {label} | {ms:.4f} | {tf:.0f} |")
    print("\nper block (4 GEMMs):")
    for label, ms in total.items():
        print(f"  {label:22s} {ms:.4f} ms")
    bf16 = total["bf16 fwd"] + total["bf16 dgrad"] + total["bf16 wgrad"]
    row = total["fp8 row fwd fast"] + total["fp8 row dgrad"] + total["bf16 wgrad"]
    ten = total["fp8 tensor fwd"] + total["fp8 tensor dgrad"] + total["fp8 tensor wgrad"]
    print(f"  training GEMMs per block: bf16 {bf16:.3f} ms, rowwise recipe {row:.3f} ms ({bf16 / row:.2f}x), "
          f"tensorwise recipe {ten:.3f} ms ({bf16 / ten:.2f}x)")


if __name__ == "__main__":
    main()
