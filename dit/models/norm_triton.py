"""Triton kernels of ``norm_kernels.group_norm_act`` (imported only when they run: this module needs Triton).

Row passes (``gn_stats``, ``gn_apply``, ``gn_bwd_sums``, ``gn_bwd_apply``): program (n, s, cb) walks rows
[s * RPP, (s + 1) * RPP) of image n's (L, C) NHWC plane, the channels of block cb, BLOCK_R rows per step.
Per-sample passes (``gn_coef``, ``gn_bwd_coef``): program n holds the sample's C channels as (groups, channels per
group) and sums the row passes' per-program partials, stored as (2, N, S, C) with plane = N * S * C.
The formulas are those of the reference in norm_kernels.py (``_forward_ref``, ``_backward_ref``, ``_coefficients``).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _channels(C, BLOCK_C: tl.constexpr):
    """This program's channel block: indices (BLOCK_C,) and their mask."""
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    return cols, cols < C


@triton.jit
def _rows(L, C, cols, cm, r0, RPP: tl.constexpr, BLOCK_R: tl.constexpr):
    """Offsets (BLOCK_R, BLOCK_C) into the (N, L, C) tensor, and their mask, of step r0 of program (n, s, cb)."""
    n, s = tl.program_id(0), tl.program_id(1)
    rows = s * RPP + r0 + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
    m = (rows < L)[:, None] & cm[None, :]
    return n.to(tl.int64) * L * C + rows[:, None].to(tl.int64) * C + cols[None, :], m


@triton.jit
def _silu_grad(dy, v, a, b):
    """The gradient at z = a x + b of silu(z), from dy: dy * s (1 + z (1 - s)) with s = sigmoid(z)."""
    z = v * a[None, :] + b[None, :]
    sg = tl.sigmoid(z)
    return dy * sg * (1.0 + z * (1.0 - sg))


@triton.jit
def _sample_sums(part_ptr, n, C, S, plane, G, CG, BLOCK_G: tl.constexpr, BLOCK_J: tl.constexpr):
    """Sample n's two partial sums over the S row programs, as (groups, channels per group), with the channel
    indices and mask."""
    g = tl.arange(0, BLOCK_G)[:, None]
    j = tl.arange(0, BLOCK_J)[None, :]
    c = g * CG + j  # (BLOCK_G, BLOCK_J) channel index
    m = (g < G) & (j < CG)
    s1 = tl.zeros((BLOCK_G, BLOCK_J), tl.float32)
    s2 = tl.zeros((BLOCK_G, BLOCK_J), tl.float32)
    for s in range(0, S):
        off = (n * S + s).to(tl.int64) * C + c
        s1 += tl.load(part_ptr + off, mask=m, other=0.0)
        s2 += tl.load(part_ptr + plane + off, mask=m, other=0.0)
    return c, m, s1, s2


@triton.jit
def _affine(w_ptr, b_ptr, sc_ptr, n, sc_stride, c, m, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
            HAS_SC: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_J: tl.constexpr):
    """At channels c of sample n: GroupNorm's affine weight and bias (1 and 0 without them) and AdaGN's 1 + scale."""
    w = tl.full((BLOCK_G, BLOCK_J), 1.0, tl.float32)
    b = tl.zeros((BLOCK_G, BLOCK_J), tl.float32)
    one_s = tl.full((BLOCK_G, BLOCK_J), 1.0, tl.float32)
    if HAS_W:
        w = tl.load(w_ptr + c, mask=m, other=1.0).to(tl.float32)
    if HAS_B:
        b = tl.load(b_ptr + c, mask=m, other=0.0).to(tl.float32)
    if HAS_SC:
        one_s += tl.load(sc_ptr + n * sc_stride + c, mask=m, other=0.0).to(tl.float32)
    return w, b, one_s


@triton.jit
def _store_partials(part_ptr, a1, a2, C, S, plane, cols, cm):
    """Column sums of this program's two (BLOCK_R, BLOCK_C) accumulators into the (2, N, S, C) partials."""
    off = (tl.program_id(0) * S + tl.program_id(1)).to(tl.int64) * C + cols
    tl.store(part_ptr + off, tl.sum(a1, axis=0), mask=cm)
    tl.store(part_ptr + plane + off, tl.sum(a2, axis=0), mask=cm)


@triton.jit
def triton_dit_gn_stats(x_ptr, part_ptr, L, C, S, plane, RPP: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_C: tl.constexpr, STAGES: tl.constexpr):
    # sums of (x - k) and (x - k)^2, k: each channel's first value (a mean far above the spread does not cancel)
    cols, cm = _channels(C, BLOCK_C)
    k = tl.load(x_ptr + tl.program_id(0).to(tl.int64) * L * C + cols, mask=cm, other=0.0).to(tl.float32)
    a1 = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
    a2 = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
    for r0 in tl.range(0, RPP, BLOCK_R, num_stages=STAGES):
        offs, m = _rows(L, C, cols, cm, r0, RPP, BLOCK_R)
        d = tl.where(m, tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32) - k[None, :], 0.0)
        a1 += d
        a2 += d * d
    _store_partials(part_ptr, a1, a2, C, S, plane, cols, cm)


@triton.jit
def triton_dit_gn_coef(part_ptr, x_ptr, w_ptr, b_ptr, sc_ptr, sh_ptr, st_ptr, L, C, S, plane, G, CG,
                       sc_stride, sh_stride, eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                       HAS_SC: tl.constexpr, HAS_SH: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_J: tl.constexpr):
    n = tl.program_id(0)
    c, m, s1, s2 = _sample_sums(part_ptr, n, C, S, plane, G, CG, BLOCK_G, BLOCK_J)
    k = tl.load(x_ptr + n.to(tl.int64) * L * C + c, mask=m, other=0.0).to(tl.float32)
    mean_c = k + s1 / L
    m2_c = s2 - s1 * s1 / L
    mean_g = tl.sum(tl.where(m, mean_c, 0.0), axis=1) / CG  # (BLOCK_G,)
    dev = tl.where(m, mean_c - mean_g[:, None], 0.0)
    m2_g = tl.sum(tl.where(m, m2_c, 0.0), axis=1) + L * tl.sum(dev * dev, axis=1)  # parallel-variance formula
    r = 1.0 / tl.sqrt(tl.maximum(m2_g, 0.0) / (L * CG) + eps)  # (BLOCK_G,)
    w, bb, one_s = _affine(w_ptr, b_ptr, sc_ptr, n, sc_stride, c, m, HAS_W, HAS_B, HAS_SC, BLOCK_G, BLOCK_J)
    gam = w * one_s  # z = gam * xhat + bet
    bet = bb * one_s
    if HAS_SH:
        bet += tl.load(sh_ptr + n * sh_stride + c, mask=m, other=0.0).to(tl.float32)
    a = r[:, None] * gam
    base = n.to(tl.int64) * 5 * C + c  # st: (N, 5, C) = A, B, k, mu, r
    tl.store(st_ptr + base, a, mask=m)
    tl.store(st_ptr + base + C, bet - mean_g[:, None] * a, mask=m)
    tl.store(st_ptr + base + 2 * C, k, mask=m)
    tl.store(st_ptr + base + 3 * C, mean_g[:, None] + 0.0 * a, mask=m)
    tl.store(st_ptr + base + 4 * C, r[:, None] + 0.0 * a, mask=m)


@triton.jit
def triton_dit_gn_apply(x_ptr, st_ptr, y_ptr, L, C, RPP: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_C: tl.constexpr, SILU: tl.constexpr, STAGES: tl.constexpr):
    cols, cm = _channels(C, BLOCK_C)
    st = st_ptr + tl.program_id(0) * 5 * C + cols
    a = tl.load(st, mask=cm, other=0.0)
    b = tl.load(st + C, mask=cm, other=0.0)
    for r0 in tl.range(0, RPP, BLOCK_R, num_stages=STAGES):
        offs, m = _rows(L, C, cols, cm, r0, RPP, BLOCK_R)
        z = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32) * a[None, :] + b[None, :]
        if SILU:
            z = z * tl.sigmoid(z)
        tl.store(y_ptr + offs, z.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def triton_dit_gn_bwd_sums(x_ptr, dy_ptr, st_ptr, part_ptr, L, C, S, plane, RPP: tl.constexpr,
                           BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, SILU: tl.constexpr, STAGES: tl.constexpr):
    # P = sum dz and Q = sum dz (x - k)
    cols, cm = _channels(C, BLOCK_C)
    st = st_ptr + tl.program_id(0) * 5 * C + cols
    a = tl.load(st, mask=cm, other=0.0)
    b = tl.load(st + C, mask=cm, other=0.0)
    k = tl.load(st + 2 * C, mask=cm, other=0.0)
    ap = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
    aq = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
    for r0 in tl.range(0, RPP, BLOCK_R, num_stages=STAGES):
        offs, m = _rows(L, C, cols, cm, r0, RPP, BLOCK_R)
        v = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        dz = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)  # 0 on masked lanes
        if SILU:
            dz = _silu_grad(dz, v, a, b)
        ap += dz
        aq += dz * (v - k[None, :])
    _store_partials(part_ptr, ap, aq, C, S, plane, cols, cm)


@triton.jit
def triton_dit_gn_bwd_coef(part_ptr, st_ptr, w_ptr, b_ptr, sc_ptr, coef_ptr, dw_ptr, db_ptr, ds_ptr, dt_ptr,
                           L, C, S, plane, G, CG, sc_stride, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                           HAS_SC: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_J: tl.constexpr):
    n = tl.program_id(0)
    c, m, p, q = _sample_sums(part_ptr, n, C, S, plane, G, CG, BLOCK_G, BLOCK_J)
    base = n.to(tl.int64) * 5 * C + c
    a = tl.load(st_ptr + base, mask=m, other=0.0)
    k = tl.load(st_ptr + base + 2 * C, mask=m, other=0.0)
    mu = tl.load(st_ptr + base + 3 * C, mask=m, other=0.0)
    r = tl.load(st_ptr + base + 4 * C, mask=m, other=1.0)
    gam = a / r
    dgam = r * (q + (k - mu) * p)  # sum dz * xhat
    m1 = tl.sum(tl.where(m, gam * p, 0.0), axis=1) / (CG * L)  # (BLOCK_G,) group means of dxhat, dxhat * xhat
    m2 = tl.sum(tl.where(m, gam * dgam, 0.0), axis=1) / (CG * L)
    c1 = -r * r * m2[:, None]
    c0 = r * r * m2[:, None] * mu - r * m1[:, None]
    cbase = n.to(tl.int64) * 2 * C + c  # coef: (N, 2, C) = C1, C0
    tl.store(coef_ptr + cbase, c1, mask=m)
    tl.store(coef_ptr + cbase + C, c0, mask=m)
    w, bb, one_s = _affine(w_ptr, b_ptr, sc_ptr, n, sc_stride, c, m, HAS_W, HAS_B, HAS_SC, BLOCK_G, BLOCK_J)
    gbase = n.to(tl.int64) * C + c  # (N, C) each: dweight and dbias per sample, dscale, dshift
    tl.store(dw_ptr + gbase, dgam * one_s, mask=m)
    tl.store(db_ptr + gbase, p * one_s, mask=m)
    tl.store(ds_ptr + gbase, (dgam * w + p * bb).to(ds_ptr.dtype.element_ty), mask=m)
    tl.store(dt_ptr + gbase, p.to(dt_ptr.dtype.element_ty), mask=m)


@triton.jit
def triton_dit_gn_bwd_apply(x_ptr, dy_ptr, st_ptr, coef_ptr, dx_ptr, L, C, RPP: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, SILU: tl.constexpr, STAGES: tl.constexpr):
    # dx = A dz + C1 x + C0
    cols, cm = _channels(C, BLOCK_C)
    n = tl.program_id(0)
    st = st_ptr + n * 5 * C + cols
    a = tl.load(st, mask=cm, other=0.0)
    b = tl.load(st + C, mask=cm, other=0.0)
    c1 = tl.load(coef_ptr + n * 2 * C + cols, mask=cm, other=0.0)
    c0 = tl.load(coef_ptr + n * 2 * C + C + cols, mask=cm, other=0.0)
    for r0 in tl.range(0, RPP, BLOCK_R, num_stages=STAGES):
        offs, m = _rows(L, C, cols, cm, r0, RPP, BLOCK_R)
        v = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        dz = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
        if SILU:
            dz = _silu_grad(dz, v, a, b)
        dx = a[None, :] * dz + c1[None, :] * v + c0[None, :]
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)
