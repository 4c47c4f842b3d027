"""Self-attention over the packed qkv GEMM output for training, its backward in Triton kernels.

In a DiT's compiled training step on an H100, ``F.scaled_dot_product_attention`` (cuDNN) spent more time around its
backward kernel than in it (docs/benchmarks.md, run 14, per DiT-S/2 block at batch 256): 271 us in the flash backward
kernel, then 75 us for cuDNN's rowsum(dO * O) pass, 58 us converting dQ from fp32, and 115-136 us assembling dq, dk, dv
into the qkv GEMM's (N * T, 3C) output gradient and its bias gradient (``kernels.qkv_grad``). ``packed_attention``
keeps cuDNN's forward (which also returns the log-sum-exp of every softmax row) and does the backward in two
FlashAttention-2 kernels (attention_triton.py) that read q, k, v straight from the packed GEMM output, compute
rowsum(dO * O) on the way, and write dq, dk, dv straight into the packed gradient, with its column sums per block.
``qkv_attention`` adds the qkv projection, whose bias gradient is then the sum of those partials: DiT-S/2's compiled
training step 35.6 -> 33.9 ms (7,139 -> 7,487 img/s, 1.049x; run 16). Head dims 16, 32, 64 (DiT-S/B/L, the UNets)
and DiT-XL's 72, as a 64-wide block and a 16-wide masked tail: DiT-XL/2's trainer 559 -> 569 img/s (1.018x; run 17).
The head dim is a compile-time constant of the kernels: as a run-time argument, 72 (not a multiple of 16) kept Triton
from proving the heads' columns 16-byte aligned, the loads were not vectorised, and the kernels ran 2.9x slower.

Both are ``torch.library.custom_op``s (opaque to torch.compile, CUDA-graph safe) with autograd. Their CPU
implementation, and the CUDA one outside bf16/fp16, is the reference: the same formulas in the accumulation dtype
(float64 for float64 inputs), against which the kernels are tested.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from . import quack_gemm
from .kernels import _acc, _use_triton, weight_grad

_LOG2E = 1.4426950408889634


def _split(qkv: torch.Tensor, heads: int):
    """(N, T, 3C) -> q, k, v (N, H, T, Dh): views of the packed tensor."""
    n, t, c3 = qkv.shape
    return qkv.view(n, t, 3, heads, c3 // (3 * heads)).permute(2, 0, 3, 1, 4).unbind(0)


def _forward_ref(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T / sqrt(Dh)) v in the accumulation dtype -> (o (N, T, C) in qkv's dtype, lse (N, H, T))."""
    n, t, c3 = qkv.shape
    q, k, v = (z.to(_acc(qkv)) for z in _split(qkv, heads))
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (N, H, T, T)
    lse = torch.logsumexp(s, dim=-1)  # (N, H, T)
    o = torch.exp(s - lse[..., None]) @ v  # (N, H, T, Dh)
    return o.transpose(1, 2).reshape(n, t, c3 // 3).to(qkv.dtype), lse


def _backward_ref(qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, do: torch.Tensor,
                  heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """FlashAttention-2's backward formulas (attention_triton.py) in the accumulation dtype -> (dqkv like qkv, the
    per-block column sums of dqkv (N, cdiv(T, ROWS), 3C) in the accumulation dtype)."""
    n, t, c3 = qkv.shape
    acc = _acc(qkv)
    q, k, v = (z.to(acc) for z in _split(qkv, heads))
    dh = q.shape[-1]
    o4, do4 = (z.to(acc).view(n, t, heads, dh).transpose(1, 2) for z in (o, do))  # (N, H, T, Dh)
    scale = 1.0 / math.sqrt(dh)
    p = torch.exp(q @ k.transpose(-1, -2) * scale - lse.to(acc)[..., None])  # (N, H, T, T)
    dv = p.transpose(-1, -2) @ do4
    dp = do4 @ v.transpose(-1, -2)
    ds = p * (dp - (do4 * o4).sum(-1, keepdim=True))
    dq, dk = ds @ k * scale, ds.transpose(-1, -2) @ q * scale
    dqkv = torch.stack((dq, dk, dv), dim=2).transpose(1, 3).reshape(n, t, c3)  # (N, T, 3, H, Dh) -> (N, T, 3C)
    nb = -(-t // ROWS)
    part = F.pad(dqkv, (0, 0, 0, nb * ROWS - t)).view(n, nb, ROWS, c3).sum(2)  # (N, nb, 3C)
    return dqkv.to(qkv.dtype), part


# Head dims the Triton backward takes: timed at 64 (DiT-S/B/L, the UNets) and 72 (DiT-XL: a 64-wide block + a 16-wide
# tail, 0.34 ms at DiT-XL/2's shape against 0.43-0.54 padded to 128 lanes), checked on the GPU at 32 too (runs 16-17).
HEAD_DIMS = (16, 32, 64, 72)
ROWS = 64  # query rows of a dq program, key rows of a dkdv program: the bias gradient's partials come per block


def fused_attention_supported(head_dim: int) -> bool:
    """Whether ``qkv_attention`` takes heads of this size (with bf16/fp16 on CUDA: the Triton backward; elsewhere
    the reference formulas, which materialise the (T, T) attention matrices)."""
    return head_dim in HEAD_DIMS


def _use_kernels(qkv: torch.Tensor, heads: int) -> bool:
    # cuDNN and the kernels take bf16/fp16; an fp32 model takes the reference
    return (_use_triton(qkv) and qkv.dtype in (torch.bfloat16, torch.float16)
            and qkv.shape[-1] // (3 * heads) in HEAD_DIMS)


# ---- CUDA: cuDNN's forward, Triton's backward ---------------------------------------------------------------------

_CUDNN_FAILED: set[tuple] = set()  # (device, dtype, head dim) where cuDNN's attention refused: efficient attention


def _forward_cuda(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cuDNN's attention on Hopper and newer, else the memory-efficient kernel (both return the log-sum-exp):
    qkv (N, T, 3C) -> (o (N, T, C), lse (N, H, T) fp32)."""
    n, t, c3 = qkv.shape
    q, k, v = _split(qkv, heads)
    key = (qkv.device, qkv.dtype, q.shape[-1])
    out = None
    if key not in _CUDNN_FAILED and torch.cuda.get_device_capability(qkv.device) >= (9, 0):
        try:
            out = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True)
        except RuntimeError:  # this cuDNN does not take these shapes: the memory-efficient kernel from now on
            _CUDNN_FAILED.add(key)
    if out is None:
        out = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)
    o, lse = out[0], out[1]  # (N, H, T, Dh); (N, H, T) or (N, H, T, 1), padded along T by some backends
    lse = lse.reshape(n, heads, -1)[..., :t].float().contiguous()
    return o.transpose(1, 2).reshape(n, t, c3 // 3).contiguous(), lse


@functools.cache
def _kernels():
    """Triton and the kernels' module, imported on first use (attention_triton.py needs Triton)."""
    import triton

    from . import attention_triton

    return triton, attention_triton


def _tiles(dh: int) -> dict:
    """Launch parameters of both kernels at head dim ``dh`` (their outer block is ROWS): the inner block (keys per
    step of dq, queries per step of dkdv), warps and pipeline stages. The fastest of 7-9 each at DiT-S/2's, DiT-B/2's
    and DiT-XL/2's shapes on an H100 (scripts/probe_attention.py; docs/benchmarks.md, runs 16-17); 8 warps were
    1.2-1.8x slower. Heads with a tail block (72 = 64 + 16) do better with 32 keys per step in dq and 64 queries
    per step in dkdv: 0.341 ms for both kernels at DiT-XL/2's shape against 0.366 ms with the 64-wide heads' tiles."""
    if _widths(dh)[1]:
        return dict(dq=dict(BLOCK_N=32, num_warps=4, STAGES=3), dkdv=dict(BLOCK_M=64, num_warps=4, STAGES=3))
    return dict(dq=dict(BLOCK_N=64, num_warps=4, STAGES=3), dkdv=dict(BLOCK_M=32, num_warps=4, STAGES=3))


def _widths(dh: int, split: bool = True) -> tuple[int, int]:
    """The kernels' head-dim blocks (BLOCK_D, TAIL): the largest power of two <= dh (at least 16) and what is left,
    padded to a power of two >= 16 (0 if nothing is): 72 -> (64, 16). ``split=False``: one block padded to the next
    power of two (72 -> (128, 0))."""
    main = max(16, 1 << (dh.bit_length() - 1))
    if not split and main < dh:
        main *= 2
    rest = dh - main
    return main, 0 if rest <= 0 else max(16, 1 << (rest - 1).bit_length())


def _backward_triton(qkv, o, lse, do, heads, tiles: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The two kernels, ``dq`` first (it stores rowsum(dO * O) for ``dkdv``): qkv (N, T, 3C), o and do (N, T, C),
    lse (N, H, T) -> (dqkv (N, T, 3C), per-block column sums (N, cdiv(T, ROWS), 3C) fp32). ``tiles``: as ``_tiles``,
    and ``split=False`` to pad the head dim to one power-of-two block instead of a tail (``_widths``; the probe's)."""
    triton, k = _kernels()
    n, t, c3 = qkv.shape
    dh = c3 // (3 * heads)
    tiles = tiles or _tiles(dh)
    block_d, tail = _widths(dh, tiles.get("split", True))
    scale = 1.0 / math.sqrt(dh)
    grid = (triton.cdiv(t, ROWS), n * heads)
    dqkv = torch.empty_like(qkv)
    part = torch.empty(n, grid[0], c3, dtype=torch.float32, device=qkv.device)  # every entry written
    delta = torch.empty(n, heads, t, dtype=torch.float32, device=qkv.device)  # rowsum(dO * O), from dq for dkdv
    dq, dkdv = tiles["dq"], tiles["dkdv"]
    k.triton_dit_attn_bwd_dq[grid](qkv, o, do, lse, delta, dqkv, part, t, heads, dh, scale, scale * _LOG2E,
                                   BLOCK_M=ROWS, BLOCK_N=dq["BLOCK_N"], BLOCK_D=block_d, TAIL=tail,
                                   STAGES=dq["STAGES"], num_warps=dq["num_warps"])
    k.triton_dit_attn_bwd_dkdv[grid](qkv, do, lse, delta, dqkv, part, t, heads, dh, scale, scale * _LOG2E,
                                     BLOCK_M=dkdv["BLOCK_M"], BLOCK_N=ROWS, BLOCK_D=block_d, TAIL=tail,
                                     STAGES=dkdv["STAGES"], num_warps=dkdv["num_warps"])
    return dqkv, part


# ---- the ops ------------------------------------------------------------------------------------------------------


def _check(qkv: torch.Tensor, heads: int) -> None:
    if qkv.ndim != 3 or qkv.shape[-1] % (3 * heads):
        raise ValueError(f"packed_attention: qkv must be (N, T, 3C) with C divisible by heads={heads}, got shape "
                         f"{tuple(qkv.shape)}")


@torch.library.custom_op("dit::packed_attention_fwd", mutates_args=())
def packed_attention_fwd(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-attention of the packed qkv (N, T, 3C) -> (o (N, T, C) in qkv's dtype, lse (N, H, T) fp32 (the
    accumulation dtype): the log-sum-exp of each softmax row, kept for the backward)."""
    _check(qkv, heads)
    qkv = qkv.contiguous()
    if _use_kernels(qkv, heads):
        return _forward_cuda(qkv, heads)
    return _forward_ref(qkv, heads)


@packed_attention_fwd.register_fake
def _(qkv, heads):
    n, t, c3 = qkv.shape
    return qkv.new_empty(n, t, c3 // 3), qkv.new_empty((n, heads, t), dtype=_acc(qkv))


@torch.library.custom_op("dit::packed_attention_bwd", mutates_args=())
def packed_attention_bwd(qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, do: torch.Tensor,
                         heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of ``packed_attention_fwd``'s o: qkv (N, T, 3C), o and do (N, T, C), lse (N, H, T) -> (dqkv like qkv
    (the qkv GEMM's output gradient), its column sums per block of ROWS tokens (N, cdiv(T, ROWS), 3C) in lse's
    dtype: summed over the first two dims, the qkv bias gradient)."""
    qkv, o, do = qkv.contiguous(), o.contiguous(), do.contiguous().to(qkv.dtype)
    if _use_kernels(qkv, heads):
        return _backward_triton(qkv, o, lse.contiguous(), do, heads)
    return _backward_ref(qkv, o, lse, do, heads)


@packed_attention_bwd.register_fake
def _(qkv, o, lse, do, heads):
    n, t, c3 = qkv.shape
    return (torch.empty_like(qkv, memory_format=torch.contiguous_format),
            lse.new_empty(n, -(-t // ROWS), c3))


def _setup(ctx, inputs, output):
    qkv, heads = inputs
    ctx.save_for_backward(qkv, *output)
    ctx.heads = heads


def _backward(ctx, do, _dlse):
    qkv, o, lse = ctx.saved_tensors
    return packed_attention_bwd(qkv, o, lse, do, ctx.heads)[0], None


packed_attention_fwd.register_autograd(_backward, setup_context=_setup)


def packed_attention(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` of the q, k, v packed in the qkv GEMM's output, for training.

    qkv: (N, T, 3C), the (3, H, Dh) layout of each row that ``Attention`` splits -> (N, T, C), heads concatenated.
    Differentiable; the gradient comes back packed like qkv.
    """
    return packed_attention_fwd(qkv, heads)[0]


class _QKVAttention(torch.autograd.Function):
    """The qkv projection and the self-attention: the backward takes the qkv bias gradient from the attention
    kernels' column sums instead of a pass over the (N * T, 3C) gradient, and writes the weight and bias gradients in
    the parameters' own dtype (``kernels.weight_grad``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, heads: int, weight_c, backend: str):
        """x: (N, T, D) in the compute dtype; weight: (3C, D), bias: (3C,) in any dtype (fp32 master weights);
        weight_c: the weight in x's dtype, or None to cast it here; backend: the GEMMs' (``quack_gemm.BACKENDS``)
        -> (N, T, C)."""
        n, t, d = x.shape
        wc = weight.to(x.dtype) if weight_c is None else weight_c
        qkv = quack_gemm.linear(x.reshape(n * t, d), wc, bias.to(x.dtype), backend).view(n, t, -1)  # (N, T, 3C)
        o, lse = packed_attention_fwd(qkv, heads)  # (N, T, C), (N, H, T)
        ctx.save_for_backward(x, wc, qkv, o, lse)
        ctx.heads, ctx.dtypes, ctx.backend = heads, (weight.dtype, bias.dtype), backend
        return o

    @staticmethod
    def backward(ctx, do):
        x, wc, qkv, o, lse = ctx.saved_tensors
        dqkv, part = packed_attention_bwd(qkv, o, lse, do, ctx.heads)  # (N, T, 3C), (N, blocks, 3C)
        n, t, d = x.shape
        dqkv = dqkv.view(n * t, -1)
        w_dtype, b_dtype = ctx.dtypes
        return (quack_gemm.mm(dqkv, wc, ctx.backend).view(n, t, d), weight_grad(dqkv, x.reshape(n * t, d), w_dtype),
                part.sum((0, 1)).to(b_dtype), None, None, None)


def qkv_attention(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, heads: int,
                  weight_c: torch.Tensor | None = None, backend: str = "cublas") -> torch.Tensor:
    """The qkv projection ``x @ weight^T + bias`` and ``packed_attention`` of its output, for training.

    x: (N, T, D) in the compute dtype (autocast does not reach inside); weight: (3C, D); bias: (3C,), in their own
    dtype (fp32 master weights: cast here, gradients returned in it); ``weight_c``: the weight already in x's dtype
    (a copy the optimizer keeps, ``DiT.set_compute_weights``), used instead of a cast -> (N, T, C), heads
    concatenated. Differentiable in x, weight and bias. ``backend``: the qkv GEMM's and its input gradient's
    (``dit.models.quack_gemm``; the weight gradient stays cuBLAS's).
    """
    return _QKVAttention.apply(x, weight, bias, heads, weight_c, backend)
