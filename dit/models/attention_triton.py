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
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile(rows, T, H, DH, stride, col0, BLOCK_D: tl.constexpr):
    """Offsets (BLOCK, BLOCK_D) and mask of token rows ``rows`` of this program's image n and head h (program
    (i, n * H + h)) in a row-major tensor of row stride ``stride`` whose head-h values start at column
    ``col0 + h * DH``: the q/k/v slots of the packed (N * T, 3C) tensor (col0 = 0, C, 2C) or o/do (N * T, C)."""
    nh = tl.program_id(1)
    n, h = nh // H, nh % H
    d = tl.arange(0, BLOCK_D)
    offs = (n * T + rows)[:, None].to(tl.int64) * stride + (col0 + h * DH + d)[None, :]
    return offs, (rows < T)[:, None] & (d < DH)[None, :]


@triton.jit
def _lse2(lse_ptr, rows, T):
    """Log-sum-exp of query rows ``rows`` in the log2 domain (BLOCK,): exp(s - lse) = exp2(s log2 e - lse log2 e)."""
    lse = tl.load(lse_ptr + tl.program_id(1).to(tl.int64) * T + rows, mask=rows < T, other=0.0)
    return lse * 1.4426950408889634


@triton.jit
def _column_sums(part_ptr, g, m, T, H, DH, col0, BLOCK_D: tl.constexpr):
    """Store the column sums of this program's gradient rows g (BLOCK, BLOCK_D) (mask m) at row (n, i) of the
    per-block partials (N, cdiv(T, BLOCK), 3C), head h's columns from col0: the qkv bias gradient's pieces."""
    nh = tl.program_id(1)
    n, h = nh // H, nh % H
    d = tl.arange(0, BLOCK_D)
    row = n.to(tl.int64) * tl.num_programs(0) + tl.program_id(0)
    tl.store(part_ptr + row * 3 * H * DH + col0 + h * DH + d, tl.sum(tl.where(m, g, 0.0), axis=0), mask=d < DH)


@triton.jit
def triton_dit_attn_bwd_dq(qkv_ptr, o_ptr, do_ptr, lse_ptr, delta_ptr, dqkv_ptr, part_ptr, T, H, DH, scale,
                           scale_log2, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                           STAGES: tl.constexpr):
    """dQ of query block i (BLOCK_M queries) of program (i, n * H + h), over all T keys; stores D = rowsum(dO * O)
    of these rows for ``dkdv`` (which runs next) and dQ's column sums."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    qoffs, qm = _tile(rows, T, H, DH, 3 * H * DH, 0, BLOCK_D)
    q = tl.load(qkv_ptr + qoffs, mask=qm, other=0.0)  # (BLOCK_M, BLOCK_D)
    ooffs, _ = _tile(rows, T, H, DH, H * DH, 0, BLOCK_D)
    do = tl.load(do_ptr + ooffs, mask=qm, other=0.0)
    o = tl.load(o_ptr + ooffs, mask=qm, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)  # (BLOCK_M,)
    tl.store(delta_ptr + tl.program_id(1).to(tl.int64) * T + rows, delta, mask=rows < T)
    lse2 = _lse2(lse_ptr, rows, T)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in tl.range(0, T, BLOCK_N, num_stages=STAGES):
        keys = n0 + tl.arange(0, BLOCK_N)
        koffs, km = _tile(keys, T, H, DH, 3 * H * DH, H * DH, BLOCK_D)
        k = tl.load(qkv_ptr + koffs, mask=km, other=0.0)  # (BLOCK_N, BLOCK_D)
        v = tl.load(qkv_ptr + koffs + H * DH, mask=km, other=0.0)
        s = tl.dot(q, tl.trans(k))  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(s * scale_log2 - lse2[:, None])
        p = tl.where((keys < T)[None, :], p, 0.0)  # padding keys do not exist
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    dq = dq * scale
    tl.store(dqkv_ptr + qoffs, dq.to(dqkv_ptr.dtype.element_ty), mask=qm)
    _column_sums(part_ptr, dq, qm, T, H, DH, 0, BLOCK_D)


@triton.jit
def triton_dit_attn_bwd_dkdv(qkv_ptr, do_ptr, lse_ptr, delta_ptr, dqkv_ptr, part_ptr, T, H, DH, scale, scale_log2,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                             STAGES: tl.constexpr):
    """dK, dV of key block i (BLOCK_N keys) of program (i, n * H + h), over all T queries, and their column sums."""
    keys = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    koffs, km = _tile(keys, T, H, DH, 3 * H * DH, H * DH, BLOCK_D)
    k = tl.load(qkv_ptr + koffs, mask=km, other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(qkv_ptr + koffs + H * DH, mask=km, other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for m0 in tl.range(0, T, BLOCK_M, num_stages=STAGES):
        rows = m0 + tl.arange(0, BLOCK_M)
        qoffs, qm = _tile(rows, T, H, DH, 3 * H * DH, 0, BLOCK_D)
        q = tl.load(qkv_ptr + qoffs, mask=qm, other=0.0)  # (BLOCK_M, BLOCK_D)
        ooffs, _ = _tile(rows, T, H, DH, H * DH, 0, BLOCK_D)
        do = tl.load(do_ptr + ooffs, mask=qm, other=0.0)
        delta = tl.load(delta_ptr + tl.program_id(1).to(tl.int64) * T + rows, mask=rows < T, other=0.0)
        lse2 = _lse2(lse_ptr, rows, T)
        st = tl.dot(k, tl.trans(q))  # (BLOCK_N, BLOCK_M): S^T before the scale
        pt = tl.math.exp2(st * scale_log2 - lse2[None, :])
        pt = tl.where((rows < T)[None, :], pt, 0.0)  # padding queries do not exist
        dv += tl.dot(pt.to(do.dtype), do)
        dpt = tl.dot(v, tl.trans(do))  # (BLOCK_N, BLOCK_M)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q)
    dk = dk * scale
    tl.store(dqkv_ptr + koffs, dk.to(dqkv_ptr.dtype.element_ty), mask=km)
    tl.store(dqkv_ptr + koffs + H * DH, dv.to(dqkv_ptr.dtype.element_ty), mask=km)
    _column_sums(part_ptr, dk, km, T, H, DH, H * DH, BLOCK_D)
    _column_sums(part_ptr, dv, km, T, H, DH, 2 * H * DH, BLOCK_D)
