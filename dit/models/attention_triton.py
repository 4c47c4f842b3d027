"""Triton kernels of ``attention_kernels.packed_attention``'s backward (imported only when they run: needs Triton).

The FlashAttention-2 backward (Dao 2023, Algorithm 2) for one self-attention over the packed qkv GEMM output:
q, k, v of image n, head h are columns [w * C + h * Dh, w * C + (h + 1) * Dh) of rows [n * T, (n + 1) * T) of the
(N * T, 3C) tensor (w = 0, 1, 2), and the gradients go to the same places of an (N * T, 3C) tensor, which is the qkv
GEMM's output gradient as its backward needs it. o and do are (N * T, C), head h at columns [h * Dh, (h + 1) * Dh);
lse (N, H, T) is the forward's log-sum-exp of each softmax row (natural log).

With P = exp(S - lse) (S = scale * q k^T) and D_i = sum_d do_id o_id (the row sums that replace the softmax's
Jacobian): dV = P^T dO, dP = dO V^T, dS = P * (dP - D), dQ = scale * dS K, dK = scale * dS^T Q. ``dq`` (first)
walks all key blocks for one query block and stores D of its rows; ``dkdv`` walks all query blocks for one key block.
Both recompute P from q, k and lse, so nothing but lse comes from the forward, and no gradient is accumulated with
atomics. Each program also stores the column sums of its gradient rows, (N, cdiv(T, BLOCK), 3C) partials of the
qkv bias gradient (both kernels' outer blocks have the same number of rows), so that nothing re-reads dqkv for it.

The head dim DH is a compile-time constant (so Triton can prove each head's columns 16-byte aligned and vectorise the
loads). Its columns are a main block of BLOCK_D (a power of two) and, when DH is not one (DiT-XL's 72 = 64 + 8), a
TAIL block (a power of two >= 16, masked beyond DH): every product over the head dim is then two ``tl.dot``s, and
every gradient two accumulators, instead of one tile padded to the next power of two (128 for 72).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile(rows, T, H, DH: tl.constexpr, stride, col0, D0: tl.constexpr, WIDTH: tl.constexpr):
    """Offsets (BLOCK, WIDTH) and mask of head columns [D0, D0 + WIDTH) (those < DH) of token rows ``rows`` of this
    program's image n and head h (program (i, n * H + h)) in a row-major tensor of row stride ``stride`` whose
    head-h values start at column ``col0 + h * DH``: the q/k/v slots of the packed (N * T, 3C) tensor (col0 = 0, C,
    2C) or o/do (N * T, C)."""
    nh = tl.program_id(1)
    n, h = nh // H, nh % H
    d = D0 + tl.arange(0, WIDTH)
    offs = (n * T + rows)[:, None].to(tl.int64) * stride + (col0 + h * DH + d)[None, :]
    return offs, (rows < T)[:, None] & (d < DH)[None, :]


@triton.jit
def _lse2(lse_ptr, rows, T):
    """Log-sum-exp of query rows ``rows`` in the log2 domain (BLOCK,): exp(s - lse) = exp2(s log2 e - lse log2 e)."""
    lse = tl.load(lse_ptr + tl.program_id(1).to(tl.int64) * T + rows, mask=rows < T, other=0.0)
    return lse * 1.4426950408889634


@triton.jit
def _column_sums(part_ptr, g, m, H, DH: tl.constexpr, col0, D0: tl.constexpr, WIDTH: tl.constexpr):
    """Store the column sums of this program's gradient rows g (BLOCK, WIDTH) (mask m; head columns from D0) at row
    (n, i) of the per-block partials (N, cdiv(T, BLOCK), 3C), head h's columns from col0: the qkv bias gradient's
    pieces."""
    nh = tl.program_id(1)
    n, h = nh // H, nh % H
    d = D0 + tl.arange(0, WIDTH)
    row = n.to(tl.int64) * tl.num_programs(0) + tl.program_id(0)
    tl.store(part_ptr + row * 3 * H * DH + col0 + h * DH + d, tl.sum(tl.where(m, g, 0.0), axis=0), mask=d < DH)


@triton.jit
def triton_dit_attn_bwd_dq(qkv_ptr, o_ptr, do_ptr, lse_ptr, delta_ptr, dqkv_ptr, part_ptr, T, H, DH: tl.constexpr,
                           scale, scale_log2, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                           TAIL: tl.constexpr, STAGES: tl.constexpr):
    """dQ of query block i (BLOCK_M queries) of program (i, n * H + h), over all T keys; stores D = rowsum(dO * O)
    of these rows for ``dkdv`` (which runs next) and dQ's column sums."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    qoffs, qm = _tile(rows, T, H, DH, 3 * H * DH, 0, 0, BLOCK_D)
    q = tl.load(qkv_ptr + qoffs, mask=qm, other=0.0)  # (BLOCK_M, BLOCK_D)
    ooffs, _ = _tile(rows, T, H, DH, H * DH, 0, 0, BLOCK_D)
    do = tl.load(do_ptr + ooffs, mask=qm, other=0.0)
    o = tl.load(o_ptr + ooffs, mask=qm, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)  # (BLOCK_M,)
    if TAIL > 0:
        qoffs_t, qm_t = _tile(rows, T, H, DH, 3 * H * DH, 0, BLOCK_D, TAIL)
        q_t = tl.load(qkv_ptr + qoffs_t, mask=qm_t, other=0.0)  # (BLOCK_M, TAIL)
        ooffs_t, _ = _tile(rows, T, H, DH, H * DH, 0, BLOCK_D, TAIL)
        do_t = tl.load(do_ptr + ooffs_t, mask=qm_t, other=0.0)
        o_t = tl.load(o_ptr + ooffs_t, mask=qm_t, other=0.0)
        delta += tl.sum(do_t.to(tl.float32) * o_t.to(tl.float32), axis=1)
        dq_t = tl.zeros((BLOCK_M, TAIL), dtype=tl.float32)
    tl.store(delta_ptr + tl.program_id(1).to(tl.int64) * T + rows, delta, mask=rows < T)
    lse2 = _lse2(lse_ptr, rows, T)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in tl.range(0, T, BLOCK_N, num_stages=STAGES):
        keys = n0 + tl.arange(0, BLOCK_N)
        koffs, km = _tile(keys, T, H, DH, 3 * H * DH, H * DH, 0, BLOCK_D)
        k = tl.load(qkv_ptr + koffs, mask=km, other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(qkv_ptr + koffs + H * DH, mask=km, other=0.0)
        s = tl.dot(q, tl.trans(k))  # (BLOCK_M, BLOCK_N)
        dp = tl.dot(do, tl.trans(v))
        if TAIL > 0:
            koffs_t, km_t = _tile(keys, T, H, DH, 3 * H * DH, H * DH, BLOCK_D, TAIL)
            k_t = tl.load(qkv_ptr + koffs_t, mask=km_t, other=0.0)  # (BLOCK_N, TAIL)
            v_t = tl.load(qkv_ptr + koffs_t + H * DH, mask=km_t, other=0.0)
            s = tl.dot(q_t, tl.trans(k_t), s)
            dp = tl.dot(do_t, tl.trans(v_t), dp)
        p = tl.math.exp2(s * scale_log2 - lse2[:, None])
        p = tl.where((keys < T)[None, :], p, 0.0)  # padding keys do not exist
        ds = (p * (dp - delta[:, None])).to(k.dtype)
        dq += tl.dot(ds, k)
        if TAIL > 0:
            dq_t += tl.dot(ds, k_t)
    dq = dq * scale
    tl.store(dqkv_ptr + qoffs, dq.to(dqkv_ptr.dtype.element_ty), mask=qm)
    _column_sums(part_ptr, dq, qm, H, DH, 0, 0, BLOCK_D)
    if TAIL > 0:
        dq_t = dq_t * scale
        tl.store(dqkv_ptr + qoffs_t, dq_t.to(dqkv_ptr.dtype.element_ty), mask=qm_t)
        _column_sums(part_ptr, dq_t, qm_t, H, DH, 0, BLOCK_D, TAIL)


@triton.jit
def triton_dit_attn_bwd_dkdv(qkv_ptr, do_ptr, lse_ptr, delta_ptr, dqkv_ptr, part_ptr, T, H, DH: tl.constexpr, scale,
                             scale_log2, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                             TAIL: tl.constexpr, STAGES: tl.constexpr):
    """dK, dV of key block i (BLOCK_N keys) of program (i, n * H + h), over all T queries, and their column sums."""
    keys = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    koffs, km = _tile(keys, T, H, DH, 3 * H * DH, H * DH, 0, BLOCK_D)
    k = tl.load(qkv_ptr + koffs, mask=km, other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(qkv_ptr + koffs + H * DH, mask=km, other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    if TAIL > 0:
        koffs_t, km_t = _tile(keys, T, H, DH, 3 * H * DH, H * DH, BLOCK_D, TAIL)
        k_t = tl.load(qkv_ptr + koffs_t, mask=km_t, other=0.0)  # (BLOCK_N, TAIL)
        v_t = tl.load(qkv_ptr + koffs_t + H * DH, mask=km_t, other=0.0)
        dk_t = tl.zeros((BLOCK_N, TAIL), dtype=tl.float32)
        dv_t = tl.zeros((BLOCK_N, TAIL), dtype=tl.float32)
    for m0 in tl.range(0, T, BLOCK_M, num_stages=STAGES):
        rows = m0 + tl.arange(0, BLOCK_M)
        qoffs, qm = _tile(rows, T, H, DH, 3 * H * DH, 0, 0, BLOCK_D)
        q = tl.load(qkv_ptr + qoffs, mask=qm, other=0.0)  # (BLOCK_M, BLOCK_D)
        ooffs, _ = _tile(rows, T, H, DH, H * DH, 0, 0, BLOCK_D)
        do = tl.load(do_ptr + ooffs, mask=qm, other=0.0)
        delta = tl.load(delta_ptr + tl.program_id(1).to(tl.int64) * T + rows, mask=rows < T, other=0.0)
        lse2 = _lse2(lse_ptr, rows, T)
        st = tl.dot(k, tl.trans(q))  # (BLOCK_N, BLOCK_M): S^T before the scale
        if TAIL > 0:
            qoffs_t, qm_t = _tile(rows, T, H, DH, 3 * H * DH, 0, BLOCK_D, TAIL)
            q_t = tl.load(qkv_ptr + qoffs_t, mask=qm_t, other=0.0)  # (BLOCK_M, TAIL)
            ooffs_t, _ = _tile(rows, T, H, DH, H * DH, 0, BLOCK_D, TAIL)
            do_t = tl.load(do_ptr + ooffs_t, mask=qm_t, other=0.0)
            st = tl.dot(k_t, tl.trans(q_t), st)
        pt = tl.math.exp2(st * scale_log2 - lse2[None, :])
        pt = tl.where((rows < T)[None, :], pt, 0.0)  # padding queries do not exist
        dv += tl.dot(pt.to(do.dtype), do)
        dpt = tl.dot(v, tl.trans(do))  # (BLOCK_N, BLOCK_M)
        if TAIL > 0:
            dv_t += tl.dot(pt.to(do.dtype), do_t)
            dpt = tl.dot(v_t, tl.trans(do_t), dpt)
        dst = (pt * (dpt - delta[None, :])).to(q.dtype)
        dk += tl.dot(dst, q)
        if TAIL > 0:
            dk_t += tl.dot(dst, q_t)
    dk = dk * scale
    tl.store(dqkv_ptr + koffs, dk.to(dqkv_ptr.dtype.element_ty), mask=km)
    tl.store(dqkv_ptr + koffs + H * DH, dv.to(dqkv_ptr.dtype.element_ty), mask=km)
    _column_sums(part_ptr, dk, km, H, DH, H * DH, 0, BLOCK_D)
    _column_sums(part_ptr, dv, km, H, DH, 2 * H * DH, 0, BLOCK_D)
    if TAIL > 0:
        dk_t = dk_t * scale
        tl.store(dqkv_ptr + koffs_t, dk_t.to(dqkv_ptr.dtype.element_ty), mask=km_t)
        tl.store(dqkv_ptr + koffs_t + H * DH, dv_t.to(dqkv_ptr.dtype.element_ty), mask=km_t)
        _column_sums(part_ptr, dk_t, km_t, H, DH, H * DH, BLOCK_D, TAIL)
        _column_sums(part_ptr, dv_t, km_t, H, DH, 2 * H * DH, BLOCK_D, TAIL)
