"""GroupNorm (+ AdaGN + SiLU) of channels-last activations in Triton kernels, forward and backward.

``group_norm_act`` computes ``silu(GroupNorm(x) * (1 + scale) + shift)`` (ADM's AdaGN; each part optional) for a
channels-last x, the same function as ``layers.group_norm_moments``. Under torch.compile, Inductor's kernels for
that formula ran at 0.9-2.2 TB/s on an H100 (the per-(sample, channel) sums over the spatial dims are strided
reductions in NHWC; docs/benchmarks.md, run 14). Here every pass walks whole NHWC rows, C channels wide:

- forward: the per-(sample, channel) sums of (x - k) and (x - k)^2 (k: the channel's first value, so a mean far above
  the spread does not cancel the variance), one row block per program; a per-sample kernel combines them per group
  (parallel-variance formula) and folds the affine weight, AdaGN scale/shift and the group statistics into one
  per-(sample, channel) map z = A x + B; a third pass writes y = silu(z).
- backward: one pass for the per-(sample, channel) sums P = sum dz and Q = sum dz (x - k) (dz: the gradient at z),
  a per-sample kernel for GroupNorm's backward coefficients and the parameter gradients, and one pass for
  dx = A dz + C1 x + C0.

So x is read twice forward and twice backward (with dy), the minimum for a normalisation whose statistics span the
whole image. The per-sample kernels hold a sample's C channels as (groups, channels per group), which need not be a
power of two (ADM widths: 96 channels in 32 groups).

UNet-S's compiled training step on an H100: 5,385 -> 5,585 img/s (1.037x; Triton kernels 16.9 -> 15.0 ms per step;
docs/benchmarks.md, run 14). A first version returned its parameter gradients as slices of one buffer, and the copies
and casts around the op added as much idle GPU time as the kernels saved; now the per-sample sums and casts are left
to the compiled graph, where Inductor fuses them. The trainer uses it with ``model.norm_kernels``.

``group_norm_act`` is a ``torch.library.custom_op``: opaque to torch.compile, safe in CUDA graphs, differentiable
through a second op (``group_norm_act_backward``). Its CPU implementation (and the CUDA one without Triton, or for an
NCHW x) is the reference the kernels are tested against, in float64 against autograd. The kernels are in
norm_triton.py, imported on first use.
"""

from __future__ import annotations

import functools
import math

import torch

from .kernels import _acc, _use_triton
from .layers import group_norm_stats

_ROWS_PER_PROGRAM = 128  # spatial positions per program of the row passes


def _gamma_beta(n, c, weight, bias, scale, shift, acc, device):
    """Per-(sample, channel) multiplier and offset of the normalised x: GroupNorm's affine, then AdaGN."""
    gamma = torch.ones(n, c, dtype=acc, device=device)
    beta = torch.zeros(n, c, dtype=acc, device=device)
    if weight is not None:
        gamma = gamma * weight.to(acc)
    if bias is not None:
        beta = beta + bias.to(acc)
    if scale is not None:
        gamma = gamma * (1 + scale.to(acc))
        beta = beta * (1 + scale.to(acc))
    if shift is not None:
        beta = beta + shift.to(acc)
    return gamma, beta


def _spatial(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(*v.shape, *(1,) * (like.ndim - 2))  # (N, C) -> (N, C, 1, ...)


def _forward_ref(x, weight, bias, scale, shift, groups, eps, silu):
    n, c = x.shape[:2]
    xf, k, mu, r = group_norm_stats(x, groups, eps)  # (N, C) each but xf
    acc = xf.dtype
    gamma, beta = _gamma_beta(n, c, weight, bias, scale, shift, acc, x.device)
    a = r * gamma
    b = beta - mu * a
    z = xf * _spatial(a, x) + _spatial(b, x)
    y = torch.empty_like(x)
    y.copy_(z * torch.sigmoid(z) if silu else z)
    return y, torch.stack([a, b, k, mu, r], 1)  # (N, 5, C)


def _backward_ref(dy, x, st, weight, bias, scale, groups, silu):
    n, c = x.shape[:2]
    acc = st.dtype
    a, b, k, mu, r = st.unbind(1)  # (N, C) each
    xf = x.to(acc)
    dims = tuple(range(2, x.ndim))
    count = math.prod(x.shape[2:])
    z = xf * _spatial(a, x) + _spatial(b, x)
    dz = dy.to(acc)
    if silu:
        s = torch.sigmoid(z)
        dz = dz * s * (1 + z * (1 - s))
    p = dz.sum(dims)  # (N, C)
    q = (dz * (xf - _spatial(k, x))).sum(dims)
    c1c0, grads = _coefficients(p, q, st, weight, bias, scale, groups, count)
    dx_full = torch.empty_like(x)
    dx_full.copy_(_spatial(a, x) * dz + _spatial(c1c0[:, 0], x) * xf + _spatial(c1c0[:, 1], x))
    return (dx_full,) + grads


def _coefficients(p, q, st, weight, bias, scale, groups, count):
    """GroupNorm's backward on (N, C) sums: p = sum dz, q = sum dz (x - k) -> ((N, 2, C) [C1, C0] with
    dx = A dz + C1 x + C0, (dweight and dbias per sample, dscale, dshift: (N, C) each)). The Triton path does the same
    in ``triton_dit_gn_bwd_coef``."""
    n, c = p.shape
    acc = p.dtype
    a, _, k, mu, r = st.unbind(1)
    gamma = a / r  # r > 0
    dgamma = r * (q + (k - mu) * p)  # sum dz * xhat
    dbeta = p
    cg = c // groups
    m1 = (gamma * p).view(n, groups, cg).sum(-1, keepdim=True) / (cg * count)  # mean of dxhat over the group
    m2 = (gamma * dgamma).view(n, groups, cg).sum(-1, keepdim=True) / (cg * count)  # mean of dxhat * xhat
    m1 = m1.expand(n, groups, cg).reshape(n, c)
    m2 = m2.expand(n, groups, cg).reshape(n, c)
    c1 = -r * r * m2
    c0 = r * r * m2 * mu - r * m1
    one_s = 1 + scale.to(acc) if scale is not None else torch.ones_like(p)
    w = weight.to(acc) if weight is not None else torch.ones(c, dtype=acc, device=p.device)
    bb = bias.to(acc) if bias is not None else torch.zeros(c, dtype=acc, device=p.device)
    grads = (dgamma * one_s, dbeta * one_s, dgamma * w + dbeta * bb, dbeta)
    return torch.stack([c1, c0], 1), grads


# ---- Triton kernels (CUDA) ----------------------------------------------------------------------------------------


@functools.cache
def _triton():
    """Triton and the kernels' module, imported on first use (norm_triton.py needs Triton)."""
    import triton

    from . import norm_triton

    return triton, norm_triton


def _tiles(triton, c: int, rows_per_program: int | None):
    block_c = min(triton.next_power_of_2(c), 128)
    block_r = max(1, 4096 // block_c)  # ~4k values per step
    rpp = max(rows_per_program or _ROWS_PER_PROGRAM, block_r)
    return block_c, block_r, rpp


def _use_kernels(x: torch.Tensor) -> bool:
    return _use_triton(x) and x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last)


def _row_grid(triton, x, rows_per_program):
    """Tiles and grid of the row passes for x (N, C, H, W) channels-last: (L, S, tiles, grid)."""
    n, c, h, w = x.shape
    block_c, block_r, rpp = _tiles(triton, c, rows_per_program)
    s = triton.cdiv(h * w, rpp)
    return h * w, s, dict(RPP=rpp, BLOCK_R=block_r, BLOCK_C=block_c), (n, s, triton.cdiv(c, block_c))


def _group_tiles(triton, c, groups):
    """Tiles of the per-sample kernels: the C channels as (groups, channels per group)."""
    return dict(BLOCK_G=triton.next_power_of_2(groups), BLOCK_J=triton.next_power_of_2(c // groups))


def _forward_triton(x, weight, bias, scale, shift, groups, eps, silu, rows_per_program=None, num_warps=4, stages=3):
    triton, k = _triton()
    n, c = x.shape[:2]
    length, s, tiles, grid = _row_grid(triton, x, rows_per_program)
    part = torch.empty(2, n, s, c, dtype=torch.float32, device=x.device)  # per-program sums of (x - k), (x - k)^2
    k.triton_dit_gn_stats[grid](x, part, length, c, s, n * s * c, **tiles, STAGES=stages, num_warps=num_warps)
    st = torch.empty(n, 5, c, dtype=torch.float32, device=x.device)
    # absent operands: any tensor stands in for the pointer, the HAS_* flags keep it unread
    k.triton_dit_gn_coef[(n,)](
        part, x, *(v if v is not None else part for v in (weight, bias, scale, shift)), st,
        length, c, s, n * s * c, groups, c // groups, *(v.stride(0) if v is not None else 0 for v in (scale, shift)),
        eps, HAS_W=weight is not None, HAS_B=bias is not None, HAS_SC=scale is not None, HAS_SH=shift is not None,
        **_group_tiles(triton, c, groups), num_warps=4)
    y = torch.empty_like(x)
    k.triton_dit_gn_apply[grid](x, st, y, length, c, **tiles, SILU=silu, STAGES=stages, num_warps=num_warps)
    return y, st


def _backward_triton(dy, x, st, weight, bias, scale, groups, silu, rows_per_program=None, num_warps=4, stages=3):
    triton, k = _triton()
    n, c = x.shape[:2]
    length, s, tiles, grid = _row_grid(triton, x, rows_per_program)
    dy = dy.contiguous(memory_format=torch.channels_last)
    part = torch.empty(2, n, s, c, dtype=torch.float32, device=x.device)  # per-program P, Q
    k.triton_dit_gn_bwd_sums[grid](x, dy, st, part, length, c, s, n * s * c, **tiles, SILU=silu, STAGES=stages,
                                   num_warps=num_warps)
    co = torch.empty(n, 2, c, dtype=torch.float32, device=x.device)
    grads = [torch.empty(n, c, dtype=torch.float32, device=x.device) for _ in range(4)]
    k.triton_dit_gn_bwd_coef[(n,)](
        part, st, *(v if v is not None else part for v in (weight, bias, scale)), co, *grads,
        length, c, s, n * s * c, groups, c // groups, scale.stride(0) if scale is not None else 0,
        HAS_W=weight is not None, HAS_B=bias is not None, HAS_SC=scale is not None,
        **_group_tiles(triton, c, groups), num_warps=4)
    dx = torch.empty_like(x)
    k.triton_dit_gn_bwd_apply[grid](x, dy, st, co, dx, length, c, **tiles, SILU=silu, STAGES=stages,
                                    num_warps=num_warps)
    return (dx, *grads)


def _check(x, scale, shift, groups):
    if x.ndim < 3 or x.shape[1] % groups:
        raise ValueError(f"group_norm_act: x must be (N, C, *spatial) with C divisible by groups={groups}, got shape "
                         f"{tuple(x.shape)}")
    for v, name in ((scale, "scale"), (shift, "shift")):
        if v is not None and (v.shape != x.shape[:2] or v.stride(1) != 1):
            raise ValueError(f"group_norm_act: {name} must be (N, C) = {tuple(x.shape[:2])} with unit column stride, "
                             f"got shape {tuple(v.shape)}, strides {v.stride()}")


@torch.library.custom_op("dit::group_norm_act", mutates_args=())
def group_norm_act(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   scale: torch.Tensor | None, shift: torch.Tensor | None, groups: int, eps: float,
                   silu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``silu(GroupNorm(x; weight, bias) * (1 + scale) + shift)`` [each part optional] for x (N, C, *spatial);
    scale, shift (N, C). -> (y like x, st (N, 5, C) fp32: the per-(sample, channel) map z = A x + B as A, B, and k,
    mu, rstd, saved for the backward)."""
    _check(x, scale, shift, groups)
    if _use_kernels(x):
        return _forward_triton(x, weight, bias, scale, shift, groups, eps, silu)
    return _forward_ref(x, weight, bias, scale, shift, groups, eps, silu)


@group_norm_act.register_fake
def _(x, weight, bias, scale, shift, groups, eps, silu):
    return torch.empty_like(x), x.new_empty((x.shape[0], 5, x.shape[1]), dtype=_acc(x))


@torch.library.custom_op("dit::group_norm_act_backward", mutates_args=())
def group_norm_act_backward(dy: torch.Tensor, x: torch.Tensor, st: torch.Tensor, weight: torch.Tensor | None,
                            bias: torch.Tensor | None, scale: torch.Tensor | None, groups: int,
                            silu: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                 torch.Tensor]:
    """Gradients of ``group_norm_act`` from dy (like x) -> (dx like x, and in st's dtype, (N, C) each: dweight and
    dbias per sample (the caller sums them over the batch, where torch.compile fuses the sums), dscale, dshift),
    computed whether or not the forward had them."""
    if _use_kernels(x):
        return _backward_triton(dy, x, st, weight, bias, scale, groups, silu)
    dx, *grads = _backward_ref(dy, x, st, weight, bias, scale, groups, silu)
    return (dx, *(g.contiguous() for g in grads))


@group_norm_act_backward.register_fake
def _(dy, x, st, weight, bias, scale, groups, silu):
    n, c = x.shape[:2]
    return (torch.empty_like(x), *(st.new_empty(n, c) for _ in range(4)))


def _setup(ctx, inputs, output):
    x, weight, bias, scale, shift, groups, eps, silu = inputs
    ctx.save_for_backward(x, output[1], weight, bias, scale)
    ctx.groups, ctx.silu = groups, silu
    ctx.dtypes = tuple(None if v is None else v.dtype for v in (weight, bias, scale, shift))


def _backward(ctx, dy, _dst):
    x, st, weight, bias, scale = ctx.saved_tensors
    grads = group_norm_act_backward(dy, x, st, weight, bias, scale, ctx.groups, ctx.silu)
    dx, dw, db, ds, dt = grads
    rest = (dw.sum(0), db.sum(0), ds, dt)  # per-sample affine gradients summed over the batch
    rest = tuple(None if dtype is None else g.to(dtype) for g, dtype in zip(rest, ctx.dtypes))
    return (dx,) + rest + (None, None, None)


group_norm_act.register_autograd(_backward, setup_context=_setup)


def group_norm_kernels(x: torch.Tensor, norm: torch.nn.GroupNorm, scale: torch.Tensor | None = None,
                       shift: torch.Tensor | None = None, silu: bool = False) -> torch.Tensor:
    """``layers.group_norm_moments`` through ``group_norm_act``: x (N, C, H, W), scale/shift (N, C) -> like x."""
    weight, bias = (norm.weight, norm.bias) if norm.affine else (None, None)
    return group_norm_act(x, weight, bias, scale, shift, norm.num_groups, norm.eps, silu)[0]
