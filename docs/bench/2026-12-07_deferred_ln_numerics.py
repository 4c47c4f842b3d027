"""CPU probe: the numerics of folding adaLN's LayerNorm + modulation into the qkv / fc1 GEMMs (the "deferred
LayerNorm" route of docs/benchmarks.md, status section), before any kernel is built.

Today (model.fused_training) a kernel reads the fp32 residual x, normalises it in fp32 and writes
``a = bf16(LN(x) * (1 + scale) + shift)``, the GEMM's A operand. The deferred route instead gives the GEMM
``A' = bf16(bf16(x) * (1 + scale))`` (x rounded to bf16 by the previous GEMM's epilogue, the per-image scale applied
to each A tile in the mainloop) and finishes in the epilogue with fp32 per-row / per-image vectors, as

    out = rstd_m * (acc_mn - mu_m * c_n) + d_n + bias_n,   c = (1 + scale) W^T,   d = shift W^T

(LN(x)(1+s) W^T = rstd (x - mu)(1+s) W^T). The rounding of x now happens before its mean is taken out (its error
grows by about sqrt(1 + mu^2 / sigma^2) per row, printed), and there are two roundings instead of one. This script emulates both paths in float32 arithmetic on bf16-rounded operands (GEMMs
accumulate in fp32, as tensor cores do), everything else equal, and reports each one's output error against the
float64 model, for a DiT with randomised adaLN-Zero layers (as tools/benchmark.py checks numerics), with the
embedders and final layer in bf16 (as autocast runs them) and in fp32 (the blocks' own error alone):

    PYTHONPATH=. python docs/bench/2026-12-07_deferred_ln_numerics.py DiT-XL/2 --batch 2
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from dit.benchmark import _randomise_zero_init
from dit.models import create_model

BF16 = torch.bfloat16
MEAN_RATIOS: list[torch.Tensor] = []  # |mu| / sigma of every LayerNorm input row: the deferred path's error factor


def rb(t: torch.Tensor) -> torch.Tensor:
    """Round to bf16 and back to fp32 (what a bf16 store then load does)."""
    return t.to(BF16).float()


def gemm(a: torch.Tensor, lin: torch.nn.Linear) -> torch.Tensor:
    """bf16 x bf16 GEMM with fp32 accumulation and fp32 bias, output rounded to bf16. a: (..., K) -> (..., N)."""
    return rb(rb(a) @ rb(lin.weight.float()).T + lin.bias.float())


def deferred_gemm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                  lin: torch.nn.Linear) -> torch.Tensor:
    """The deferred-LayerNorm GEMM: x (N, T, K) fp32 residual; shift, scale (N, K) -> (N, T, Nout) bf16-rounded."""
    mu = x.mean(-1, keepdim=True)  # (N, T, 1), from the previous epilogue's row sums in fp32
    rstd = torch.rsqrt(x.var(-1, unbiased=False, keepdim=True) + eps)  # (N, T, 1)
    MEAN_RATIOS.append((mu.abs() * rstd).flatten())
    w = rb(lin.weight.float())  # (Nout, K)
    a = rb(rb(x) * (1 + scale.unsqueeze(1)))  # (N, T, K): the A-tile transform, re-rounded for the MMA
    acc = a @ w.T  # (N, T, Nout), fp32 accumulation
    c = ((1 + scale) @ w.T).unsqueeze(1)  # (N, 1, Nout)
    d = (shift @ w.T).unsqueeze(1)  # (N, 1, Nout)
    return rb(rstd * (acc - mu * c) + d + lin.bias.float())


def block(blk, x: torch.Tensor, c: torch.Tensor, deferred: bool) -> torch.Tensor:
    """One DiT block in emulated bf16 with the fp32 residual stream; x: (N, T, D) fp32, c: (N, D) -> (N, T, D)."""
    n, t, d = x.shape
    mod = gemm(F.silu(c), blk.adaLN_modulation[1])  # (N, 6D)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)

    def ln_mod(x, shift, scale, eps, lin):
        if deferred:
            return deferred_gemm(x, shift, scale, eps, lin)
        h = F.layer_norm(x, (d,), eps=eps) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)  # fp32 in the kernel
        return gemm(h, lin)

    qkv = ln_mod(x, shift_msa, scale_msa, blk.norm1.eps, blk.attn.qkv)  # (N, T, 3D)
    heads, dh = blk.attn.num_heads, d // blk.attn.num_heads
    q, k, v = qkv.view(n, t, 3, heads, dh).permute(2, 0, 3, 1, 4).unbind(0)  # (N, H, T, Dh)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), dim=-1)  # fp32 softmax of bf16 scores' inputs
    o = rb(rb(w) @ v).transpose(1, 2).reshape(n, t, d)  # (N, T, D)
    x = x + gate_msa.unsqueeze(1) * gemm(o, blk.attn.proj)  # (N, T, D), fp32 residual
    h = ln_mod(x, shift_mlp, scale_mlp, blk.norm2.eps, blk.mlp.fc1)  # (N, T, 4D)
    h = rb(F.gelu(h, approximate="tanh"))  # (N, T, 4D)
    return x + gate_mlp.unsqueeze(1) * gemm(h, blk.mlp.fc2)  # (N, T, D)


def forward(model, x, t, y, deferred: bool | None, embed_bf16: bool = True) -> torch.Tensor:
    """The DiT forward with emulated bf16 blocks (deferred None: the float64 model itself); the embedders and the
    final layer in bf16 as under autocast, or in fp32 (``embed_bf16=False``: the blocks' own error alone)."""
    if deferred is None:
        m = model.double()
        out = m(x.double(), t, y=y)
        model.float()
        return out
    amp = torch.autocast("cpu", dtype=BF16, enabled=embed_bf16)
    with amp:  # the embedders and the final layer, outside the comparison
        h = (model.x_embedder(x) + model.pos_embed).float()  # (N, T, D), fp32 residual stream
        c = (model.t_embedder(t) + model.y_embedder(y, False)).float()  # (N, D)
    for blk in model.blocks:
        h = block(blk, h, c, deferred)
    with amp:
        return model.unpatchify(model.final_layer(h, c)).float()  # (N, C_out, H, W)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default="DiT-S/2")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seeds", type=int, default=2)
    a = p.parse_args()
    torch.set_grad_enabled(False)
    for seed in range(a.seeds):
        torch.manual_seed(seed)
        model = create_model(a.model).eval()
        _randomise_zero_init(model)
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(a.batch, model.in_channels, model.input_size, model.input_size, generator=g)
        t = torch.randint(0, 1000, (a.batch,), generator=g)
        y = torch.randint(0, 1000, (a.batch,), generator=g)
        ref = forward(model, x, t, y, None)
        rel = lambda out: ((out.double() - ref).norm() / ref.norm()).item()  # noqa: E731
        with torch.autocast("cpu", dtype=BF16):
            autocast = rel(model(x, t, y=y).float())
        row = [f"{a.model} seed {seed}: autocast bf16 {autocast:.2e}"]
        for embed_bf16 in (True, False):
            std = rel(forward(model, x, t, y, False, embed_bf16))
            dfr = rel(forward(model, x, t, y, True, embed_bf16))
            row.append(f"embedders in {'bf16' if embed_bf16 else 'fp32'}: fused path {std:.2e}, deferred "
                       f"LayerNorm {dfr:.2e} ({dfr / std:.2f}x)")
        ratio = torch.cat(MEAN_RATIOS)
        MEAN_RATIOS.clear()
        row.append(f"|mu|/sigma of the LayerNorm inputs: median {ratio.median():.2f}, max {ratio.max():.2f}")
        print(" | ".join(row), flush=True)


if __name__ == "__main__":
    main()
