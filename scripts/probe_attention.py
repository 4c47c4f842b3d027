"""Probe ``attention_kernels.packed_attention`` on a GPU: numerics against float64 next to cuDNN's, then the backward
timed against cuDNN's (its backward plus the dq/dk/dv assembly into the qkv gradient, ``kernels.qkv_grad``), with the
Triton kernels' tiles swept; at DiT-XL/2's head dim 72 also the split (64 + a 16-wide tail) against one block padded
to 128 lanes. Output: one Markdown report (docs/benchmarks.md, runs 16-17).

    python scripts/probe_attention.py --out probe.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dit.benchmark import attention_errors  # noqa: E402
from dit.benchmark import time_back_to_back as timed  # noqa: E402
from dit.models import attention_kernels as A  # noqa: E402
from dit.models.layers import _QKVProjection  # noqa: E402

SHAPES = {"DiT-S/2": (256, 256, 6, 64), "DiT-B/2": (64, 256, 12, 64), "DiT-XL/2": (64, 256, 16, 72)}  # N, T, H, Dh


def check(lines: list[str]) -> None:
    lines += ["## Numerics (bf16 inputs, relative Frobenius error against float64)", "",
              "| shape (N, T, H, Dh) | lse | o | bias grad | dq ours | dq cuDNN | dk ours | dk cuDNN | dv ours "
              "| dv cuDNN |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n, t, h, dh in [(8, 256, 6, 64), (3, 100, 4, 64), (2, 64, 8, 32)]:
        e = attention_errors(n, t, h, dh)
        errs = [e["lse"], e["o"], e["bias"]] + [e[k + sfx] for k in ("dq", "dk", "dv") for sfx in ("", "_cudnn")]
        lines.append(f"| {n}, {t}, {h}, {dh} | " + " | ".join(f"{v:.2e}" for v in errs) + " |")
    lines.append("")


def sweep(lines: list[str], best: dict) -> None:
    lines += ["## Backward time (ms; one call at the training shape)", ""]
    cfgs = [(32, 4, 2), (32, 4, 3), (64, 4, 2), (64, 4, 3), (64, 4, 4), (64, 8, 3), (128, 8, 2), (128, 8, 3),
            (128, 4, 2)]  # inner block, warps, stages; the outer block is attention_kernels.ROWS
    for name, (n, t, h, dh) in SHAPES.items():
        if dh not in A.HEAD_DIMS:
            continue
        c = h * dh
        x = torch.randn(n, t, c, device="cuda").bfloat16().requires_grad_()
        w = (torch.randn(3 * c, c, device="cuda") / c**0.5).bfloat16().requires_grad_()
        b = torch.randn(3 * c, device="cuda").bfloat16().requires_grad_()
        do = torch.randn(n, t, c, device="cuda").bfloat16()
        qkv = F.linear(x, w, b).detach()
        o, lse = A.packed_attention_fwd(qkv, h)
        res = {}
        for kind, inner in (("dq", "BLOCK_N"), ("dkdv", "BLOCK_M")):
            for blk, warps, stages in cfgs:
                tiles = A._tiles(dh)
                tiles[kind] = {inner: blk, "num_warps": warps, "STAGES": stages}
                try:
                    res[(kind, (blk, warps, stages))] = timed(lambda: A._backward_triton(qkv, o, lse, do, h, tiles))
                except Exception as e:  # noqa: BLE001 (a tile that does not fit: reported, skipped)
                    lines.append(f"- {name} {kind} {(blk, warps, stages)}: failed ({type(e).__name__}: {str(e)[:120]})")
        tiles = {}
        for kind, inner in (("dq", "BLOCK_N"), ("dkdv", "BLOCK_M")):
            blk, warps, stages = min((v, c) for (kk, c), v in res.items() if kk == kind)[1]
            tiles[kind] = {inner: blk, "num_warps": warps, "STAGES": stages}
        best[dh] = tiles
        t_bwd = timed(lambda: A._backward_triton(qkv, o, lse, do, h, tiles), iters=50)
        t_bwd_default = timed(lambda: A._backward_triton(qkv, o, lse, do, h), iters=50)
        padded = ""
        if A._widths(dh)[1]:  # a tail block: the same tiles with one block padded to a power of two instead
            t_pad = timed(lambda: A._backward_triton(qkv, o, lse, do, h, dict(tiles, split=False)), iters=50)
            padded = f"; one block padded to {A._widths(dh, split=False)[0]} lanes instead of the tail {t_pad:.3f} ms"

        # the whole projection + attention, forward and backward: today's training path against qkv_attention
        def step_plain():
            q, k, v = _QKVProjection.apply(x.view(n * t, c), w, b, n, h)
            out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, c)
            torch.autograd.grad(out, (x, w, b), do)

        def step_ours():
            out = A.qkv_attention(x, w, b, h)
            torch.autograd.grad(out, (x, w, b), do)

        t_plain, t_ours = timed(step_plain), timed(step_ours)
        flops = 2.5 * 4 * n * h * t * t * dh  # attention backward: 5 GEMMs of the forward's 2 each
        lines += [f"### {name}: N={n}, T={t}, H={h}, Dh={dh}", "",
                  f"- backward kernels, best tiles {tiles}: {t_bwd:.3f} ms ({flops / t_bwd / 1e9:.0f} TFLOP/s); "
                  f"with the default tiles {t_bwd_default:.3f} ms{padded}",
                  f"- qkv projection + attention, forward + backward: trainer's path today (_QKVProjection, "
                  f"SDPA/cuDNN, qkv_grad) {t_plain:.3f} ms; qkv_attention {t_ours:.3f} ms: **{t_plain / t_ours:.3f}x**",
                  "", "| kernel | inner block, warps, stages | both kernels (ms) |", "|---|---|---:|"]
        for (kind, cfg), v in sorted(res.items(), key=lambda kv: (kv[0][0], kv[1])):
            lines.append(f"| {kind} | {cfg} | {v:.3f} |")
        lines.append("")
        torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--out", default="probe_attention.md")
    args = p.parse_args()
    lines = [f"# packed_attention probe: {torch.cuda.get_device_name()}, torch {torch.__version__}", ""]
    try:
        check(lines)
    finally:
        Path(args.out).write_text("\n".join(lines) + "\n")
    best: dict = {}
    try:
        sweep(lines, best)
    finally:
        lines += ["", f"best tiles per head dim: {best}"]
        Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
