"""Fused Triton kernels for the memory-bound steps between a DiT block's GEMMs.

In a compiled DiT-XL/2 sampling step, after the GEMMs and attention, most of the time goes to two kinds of
memory-bound kernels (docs/benchmarks.md, runs 6 and 7):

- ``add_layernorm_modulate``: the deferred residual update ``x + gate * o``, LayerNorm without affine parameters and
  the adaLN modulation ``* (1 + scale) + shift`` (DiT paper Sec. 3.2), written in the next GEMM's input dtype:
  bf16, or E4M3 with a static FP8 scale (``dit.models.fp8``). Two per block.
- ``gelu_tanh_fp8``: the MLP's tanh-GELU with the cast of its output to E4M3 (FP8 only: in bf16 the GELU runs in the
  fc1 GEMM's epilogue, ``dit.models.layers.linear_gelu_tanh``).
- ``rowwise_fp8``: dynamic per-row E4M3 quantisation, the operand cast of FP8 training's rowwise recipe: each row
  read once, its amax and cast in registers. Inductor fused these casts into the neighbouring kernels at 1.1 TB/s
  or less, and the GELU backward with them at a quarter of its bf16 speed (docs/benchmarks.md, run 10).
- ``qkv_grad``: the attention's dq, dk, dv copied into the qkv GEMM's output gradient with the qkv bias gradient's
  column sums in the same pass (training; autograd's copy and Inductor's separate sum read them twice; run 11).

Inductor's kernels for the same code run at 2.1-2.3 TB/s on an H100 (E4M3 outputs). These kernels read each input
once and write each output once, with two-pass row statistics held in registers and ``tanh`` through one ``exp``:
2.9-3.0 TB/s, E4M3 codes identical to the reference for the GELU (``scripts/check_kernels.py``; docs/benchmarks.md,
run 7: the FP8 guided DiT-XL/2 step 191 instead of 202 ms before fast accumulation). In bf16 inference Inductor's own
LayerNorm kernels are as fast, so a bf16 model keeps its plain forward there.

The LayerNorm ops are differentiable: a compiled DiT trains through them with ``DiT.fused_training`` (the trainer's
``model.fused_training``). ``add_layernorm_modulate_backward`` does its backward in one pass (dx, the gated output's
gradient and the adaLN gradients' column sums); Inductor's kernels for the same formulas re-read the rows for the
sums. Forward: 77 us per call at DiT-XL/2's training shape against Inductor's 140-180 us; backward: 0.14 ms against
0.22 at DiT-XL/2's, 0.18-0.19 ms against 0.39 at DiT-S/2's (all loads of a step first, software-pipelined). Trainer
img/s +5.3% (XL/2), +6.7% (S/2) (docs/benchmarks.md, run 8), then +2.8% (XL/2), +1.3% (S/2) from the pipelined
backward (run 14).

Each is a ``torch.library.custom_op``: opaque to ``torch.compile`` (which compiles everything around it), safe in
CUDA graphs, with a plain PyTorch implementation on other devices that is also the reference the CUDA kernels are
checked against (and what runs on a CUDA install without Triton). Triton is imported on the first CUDA call only.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F

from .fp8 import E4M3, saturating_cast, to_float8


def _to_output(y: torch.Tensor, out_scale: float | None, out_dtype: torch.dtype) -> torch.Tensor:
    """fp32 ``y`` -> ``out_dtype``; for E4M3, scaled by ``out_scale`` and saturated at the format's maximum."""
    return saturating_cast(y, out_scale) if out_dtype == E4M3 else y.to(out_dtype)


def _check_out(name: str, out_scale: float | None, out_dtype: torch.dtype) -> None:
    if (out_dtype == E4M3) != (out_scale is not None):
        raise ValueError(f"{name}: out_scale is required for (and only for) an E4M3 output, got out_dtype="
                         f"{out_dtype}, out_scale={out_scale}")


def _acc(x: torch.Tensor) -> torch.dtype:
    """Accumulation dtype of the reference path: fp32, or float64 for float64 inputs (exact parity tests)."""
    return torch.promote_types(x.dtype, torch.float32)


def linear_gelu_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference of the GELU-epilogue GEMMs (cuBLASLt's, QuACK's): ``h = x @ weight^T + bias``,
    ``g = GELU_tanh(h)`` in ``_acc`` precision, returned as (g, h) in x's dtype. x (M, K), weight (N, K), bias (N,)."""
    acc = _acc(x)
    h = F.linear(x.to(acc), weight.to(acc), bias.to(acc))  # (M, N)
    return F.gelu(h, approximate="tanh").to(x.dtype), h.to(x.dtype)


def weight_grad(dy: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A linear layer's weight gradient ``dy^T x`` in ``dtype``, the weight's own (fp32 master weights under
    autocast): dy (M, N), x (M, K) -> (N, K).

    With bf16/fp16 operands on CUDA and an fp32 weight this is one GEMM that writes fp32 from its fp32 accumulator
    (``torch.mm(..., out_dtype=)``) instead of a bf16 result that autograd then casts to the weight's dtype: one
    rounding fewer and no cast pass over every weight (docs/benchmarks.md, run 18)."""
    if dy.dtype == dtype:
        return dy.t() @ x
    if dy.is_cuda and dtype == torch.float32 and dy.dtype in (torch.bfloat16, torch.float16) and x.dtype == dy.dtype:
        return torch.mm(dy.t(), x, out_dtype=torch.float32)
    return (dy.t() @ x).to(dtype)


@functools.cache
def has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None  # CUDA wheels ship it on Linux, not everywhere


def _use_triton(x: torch.Tensor) -> bool:
    # float64 (exact parity tests) stays on the reference: the kernels accumulate in fp32
    return x.is_cuda and x.dtype != torch.float64 and has_triton()


def _ln_modulate_ref(x, shift, scale, eps, out_scale, out_dtype):
    acc = _acc(x)
    y = F.layer_norm(x.to(acc), x.shape[-1:], eps=eps)  # (N, T, D)
    y = y * (1 + scale.to(acc).unsqueeze(1)) + shift.to(acc).unsqueeze(1)
    return _to_output(y, out_scale, out_dtype).contiguous()


@functools.cache
def _triton():
    """(triton, kernels), compiled on first use."""
    import triton
    import triton.language as tl

    @triton.jit
    def triton_dit_gelu_fp8(h_ptr, y_ptr, n, out_scale, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = 0.7978845608028654 * (h + 0.044715 * h * h * h)  # sqrt(2/pi) (h + 0.044715 h^3)
        t = 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)  # tanh(u); saturates to +-1 when exp over/underflows
        y = 0.5 * h * (1.0 + t) * out_scale
        y = tl.minimum(tl.maximum(y, -448.0), 448.0)  # saturate at E4M3's largest finite value
        tl.store(y_ptr + offs, y.to(tl.float8e4nv), mask=mask)

    @triton.jit
    def triton_dit_ln_modulate(x_ptr, o_ptr, gate_ptr, bias_ptr, shift_ptr, scale_ptr, xout_ptr, y_ptr,
                               rows_total, T, D, gate_stride, shift_stride, scale_stride, eps, out_scale,
                               HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr, OUT_FP8: tl.constexpr,
                               BLOCK_D: tl.constexpr, ROWS: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # (ROWS,) token rows of the (N*T, D) stream
        cols = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
        m = (rows < rows_total)[:, None] & (cols < D)[None, :]  # (ROWS, BLOCK_D)
        offs = rows[:, None].to(tl.int64) * D + cols[None, :]
        img = (rows // T)[:, None].to(tl.int64)  # the row's image: its (D,) gate/shift/scale vectors
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        if HAS_RES:
            o = tl.load(o_ptr + offs, mask=m, other=0.0).to(tl.float32)
            g = tl.load(gate_ptr + img * gate_stride + cols[None, :], mask=m, other=0.0).to(tl.float32)
            if HAS_BIAS:  # the bias of o's linear layer, left out of its GEMM (its gradient comes from our backward)
                o = o + tl.load(bias_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)[None, :]
            x = x + g * o
            tl.store(xout_ptr + offs, x.to(xout_ptr.dtype.element_ty), mask=m)
        mean = tl.sum(x, axis=1) / D  # (ROWS,)
        xc = tl.where(m, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)  # two-pass variance over the row in registers
        sh = tl.load(shift_ptr + img * shift_stride + cols[None, :], mask=m, other=0.0).to(tl.float32)
        sc = tl.load(scale_ptr + img * scale_stride + cols[None, :], mask=m, other=0.0).to(tl.float32)
        y = xc * rstd[:, None] * (1.0 + sc) + sh
        if OUT_FP8:
            y = tl.minimum(tl.maximum(y * out_scale, -448.0), 448.0)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=m)

    return triton, triton_dit_gelu_fp8, triton_dit_ln_modulate


@functools.cache
def _triton_rowwise():
    import triton
    import triton.language as tl

    @triton.jit
    def triton_dit_rowwise_fp8(x_ptr, y_ptr, inv_ptr, rows_total, N, ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
        cols = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        rmask = rows < rows_total
        m = rmask[:, None] & (cols < N)[None, :]
        offs = rows[:, None].to(tl.int64) * N + cols[None, :]
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)  # (ROWS, BLOCK_N)
        amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-12)  # (ROWS,); all-zero rows: any finite scale
        # to_float8's torch ops, rounding for rounding: ``448 / amax`` on a tensor is ``amax.reciprocal() * 448``,
        # with an IEEE division (Triton's "/" is approximate)
        scale = tl.div_rn(tl.full((ROWS,), 1.0, tl.float32), amax) * 448.0
        y = tl.minimum(tl.maximum(x * scale[:, None], -448.0), 448.0)  # saturate at E4M3's largest finite value
        tl.store(y_ptr + offs, y.to(tl.float8e4nv), mask=m)
        tl.store(inv_ptr + rows, tl.div_rn(tl.full((ROWS,), 1.0, tl.float32), scale), mask=rmask)

    return triton, triton_dit_rowwise_fp8


def _rowwise_fp8_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    triton, kernel = _triton_rowwise()
    x = x.contiguous()
    m, n = x.shape
    y = torch.empty((m, n), dtype=E4M3, device=x.device)
    inv = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    block_n = triton.next_power_of_2(n)
    rows = max(1, 4096 // block_n)  # ~4k values per program: one row of an MLP's 4,608 (XL), 8 of DiT-S's 384
    kernel[(triton.cdiv(m, rows),)](x, y, inv, m, n, ROWS=rows, BLOCK_N=block_n, num_warps=8 if block_n >= 4096 else 4)
    return y, inv


@torch.library.custom_op("dit::rowwise_fp8", mutates_args=())
def rowwise_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-row E4M3 quantisation, ``to_float8(x, E4M3, dim=-1)`` in one kernel on CUDA (same codes, same
    scales). An opaque op, so that ``torch.compile`` does not fuse the row reductions into its own kernels.

    x: (M, N) -> (x * s in E4M3 (M, N), 1 / s as float32 (M, 1)) with s = 448 / amax of each row.
    """
    if _use_triton(x):
        return _rowwise_fp8_triton(x)
    return to_float8(x, E4M3, dim=-1)


@rowwise_fp8.register_fake
def _(x):
    return x.new_empty(x.shape, dtype=E4M3), x.new_empty((x.shape[0], 1), dtype=torch.float32)


def _ln_mod_cuda(x, o, gate, shift, scale, eps, out_scale, out_dtype, bias=None):
    triton, _, kernel = _triton()
    n, t, d = x.shape
    for v in (shift, scale) + (() if o is None else (gate,)):
        if v.shape != (n, d) or v.stride(1) != 1:
            name = "layernorm_modulate: shift/scale" if o is None else "add_layernorm_modulate: shift/scale/gate"
            raise ValueError(f"{name} must be ({n}, {d}) with unit column stride, got shape {tuple(v.shape)}, "
                             f"strides {v.stride()}")
    x = x.contiguous()
    xout = torch.empty_like(x) if o is not None else None
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    block_d = triton.next_power_of_2(d)
    rows = max(1, 2048 // block_d)  # ~2k values per program: one row of DiT-XL (1,152 -> 2,048 lanes), 4 of DiT-S
    has_res = o is not None
    kernel[(triton.cdiv(n * t, rows),)](
        x, o.contiguous() if has_res else x, gate if has_res else shift, shift if bias is None else bias, shift,
        scale, xout if has_res else x, y, n * t, t, d, gate.stride(0) if has_res else 0, shift.stride(0),
        scale.stride(0), eps, 1.0 if out_scale is None else out_scale,
        HAS_RES=has_res, HAS_BIAS=bias is not None, OUT_FP8=out_dtype == E4M3, BLOCK_D=block_d, ROWS=rows,
        num_warps=2 if rows == 1 else 4)
    return xout, y


@torch.library.custom_op("dit::layernorm_modulate", mutates_args=())
def layernorm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
                       out_scale: float | None, out_dtype: torch.dtype) -> torch.Tensor:
    """``LN(x) * (1 + scale) + shift`` in ``out_dtype`` (E4M3: times ``out_scale``, saturating).

    x: (N, T, D); shift, scale: (N, D) -> (N, T, D).
    """
    _check_out("layernorm_modulate", out_scale, out_dtype)
    if _use_triton(x):
        return _ln_mod_cuda(x, None, None, shift, scale, eps, out_scale, out_dtype)[1]
    return _ln_modulate_ref(x, shift, scale, eps, out_scale, out_dtype)


@layernorm_modulate.register_fake
def _(x, shift, scale, eps, out_scale, out_dtype):
    return x.new_empty(x.shape, dtype=out_dtype)


def _check_bias(name: str, bias: torch.Tensor | None, d: int) -> None:
    if bias is not None and (bias.shape != (d,) or bias.stride(0) != 1):
        raise ValueError(f"{name}: bias must be a dense ({d},) vector, got shape {tuple(bias.shape)}, "
                         f"strides {bias.stride()}")


@torch.library.custom_op("dit::add_layernorm_modulate", mutates_args=())
def add_layernorm_modulate(x: torch.Tensor, o: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                           scale: torch.Tensor, eps: float, out_scale: float | None,
                           out_dtype: torch.dtype, bias: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual update ``x' = x + gate * (o + bias)`` (in ``x``'s dtype; no bias: ``x + gate * o``), then
    ``layernorm_modulate(x')``.

    x, o: (N, T, D); gate, shift, scale: (N, D); bias: (D,), the bias of the linear layer that made o, left out of
    its GEMM so that its gradient comes from this op's backward pass over the rows instead of another pass over the
    GEMM's output gradient -> (x' (N, T, D), y (N, T, D) in ``out_dtype``).
    """
    _check_out("add_layernorm_modulate", out_scale, out_dtype)
    _check_bias("add_layernorm_modulate", bias, x.shape[-1])
    if _use_triton(x):
        return _ln_mod_cuda(x, o, gate, shift, scale, eps, out_scale, out_dtype, bias)
    acc = _acc(x)
    o = o.to(acc) if bias is None else o.to(acc) + bias.to(acc)
    x = (x.to(acc) + gate.to(acc).unsqueeze(1) * o).to(x.dtype).contiguous()
    return x, _ln_modulate_ref(x, shift, scale, eps, out_scale, out_dtype)


@add_layernorm_modulate.register_fake
def _(x, o, gate, shift, scale, eps, out_scale, out_dtype, bias=None):
    return x.new_empty(x.shape), x.new_empty(x.shape, dtype=out_dtype)  # both contiguous, as the kernel writes them


@torch.library.custom_op("dit::gelu_tanh_fp8", mutates_args=())
def gelu_tanh_fp8(h: torch.Tensor, out_scale: float) -> torch.Tensor:
    """E4M3 of ``GELU_tanh(h) * out_scale``, saturated at +-448 (a static-scale ``Float8Linear``'s input cast).

    h: (..., H) -> (..., H) float8_e4m3fn.
    """
    if _use_triton(h):
        triton, kernel, _ = _triton()
        h = h.contiguous()
        y = torch.empty(h.shape, dtype=E4M3, device=h.device)
        block = 4096
        kernel[(triton.cdiv(h.numel(), block),)](h, y, h.numel(), out_scale, BLOCK=block, num_warps=8)
        return y
    return _to_output(F.gelu(h.to(_acc(h)), approximate="tanh"), out_scale, E4M3)


@gelu_tanh_fp8.register_fake
def _(h, out_scale):
    return h.new_empty(h.shape, dtype=E4M3)


# ---- autograd: the LayerNorm ops are differentiable (training with DiT.fused_training) ----------------------------
# add_layernorm_modulate (every LayerNorm but the first block's) has its own op for the backward: one Triton kernel
# on CUDA, these PyTorch formulas elsewhere (and as its reference). layernorm_modulate's backward (once per forward)
# is the formulas, traced into the backward graph and fused by Inductor under torch.compile. Both recompute the row
# statistics from the saved LayerNorm input (the updated residual stream, which the backward reads anyway) instead
# of having the forward kernel save them.


def _ln_modulate_backward(x, shift, scale, eps, dy):
    """Gradients of ``y = LN(x) * (1 + scale) + shift`` (no affine LayerNorm parameters): dy (N, T, D) ->
    (dx (N, T, D), dshift (N, D), dscale (N, D)) in the accumulation dtype."""
    acc = _acc(x)
    x, dy = x.to(acc), dy.to(acc)
    mean = x.mean(-1, keepdim=True)  # (N, T, 1)
    xc = x - mean
    rstd = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)  # (N, T, 1)
    xhat = xc * rstd  # (N, T, D)
    g = dy * (1 + scale.to(acc).unsqueeze(1))  # d loss / d xhat
    dx = rstd * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    return dx, dy.sum(1), (dy * xhat).sum(1)


def _check_differentiable(ctx_name: str, out_dtype: torch.dtype) -> None:
    if out_dtype == E4M3:
        raise RuntimeError(f"{ctx_name}: an E4M3 output has no gradient (FP8 inference only)")


def _ln_mod_setup(ctx, inputs, output):
    x, shift, scale, eps, out_scale, out_dtype = inputs
    ctx.save_for_backward(x, shift, scale)
    ctx.eps, ctx.out_dtype = eps, out_dtype


def _ln_mod_bwd(ctx, dy):
    _check_differentiable("layernorm_modulate", ctx.out_dtype)
    x, shift, scale = ctx.saved_tensors
    dx, dshift, dscale = _ln_modulate_backward(x, shift, scale, ctx.eps, dy)
    return dx.to(x.dtype), dshift.to(shift.dtype), dscale.to(scale.dtype), None, None, None


layernorm_modulate.register_autograd(_ln_mod_bwd, setup_context=_ln_mod_setup)


@functools.cache
def _triton_bwd():
    """The backward kernel of ``add_layernorm_modulate``, compiled on first use."""
    import triton
    import triton.language as tl

    @triton.jit
    def triton_dit_add_ln_modulate_bwd(x_ptr, o_ptr, dy_ptr, dxn_ptr, gate_ptr, bias_ptr, scale_ptr, dx_ptr, do_ptr,
                                       part_ptr, T, D, NB, plane, gate_stride, scale_stride, eps,
                                       HAS_DXN: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr,
                                       SUB: tl.constexpr, RPP: tl.constexpr, STAGES: tl.constexpr):
        # One program: RPP consecutive tokens of image n, SUB rows at a time, whole rows in registers.
        n = tl.program_id(0)
        b = tl.program_id(1)
        cols = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
        cmask = cols < D
        sc1 = 1.0 + tl.load(scale_ptr + n * scale_stride + cols, mask=cmask, other=0.0).to(tl.float32)
        g = tl.load(gate_ptr + n * gate_stride + cols, mask=cmask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        # Column sums over this program's tokens, kept per row slot and reduced once at the end.
        acc_shift = tl.zeros((SUB, BLOCK_D), dtype=tl.float32)
        acc_scale = tl.zeros((SUB, BLOCK_D), dtype=tl.float32)
        acc_gate = tl.zeros((SUB, BLOCK_D), dtype=tl.float32)
        acc_bias = tl.zeros((SUB, BLOCK_D), dtype=tl.float32)  # the bias's gradient: do's column sums
        # Every load of a step comes first, and the loop is software-pipelined (STAGES): the next rows are in flight
        # while this step's reductions run. With o loaded after dx's store, each step waited for memory twice:
        # 1.6 TB/s at DiT-XL/2's shape against 2.4 (docs/benchmarks.md, run 14).
        for r0 in tl.range(0, RPP, SUB, num_stages=STAGES):
            t = b * RPP + r0 + tl.arange(0, SUB)  # (SUB,) token indices
            m = (t < T)[:, None] & cmask[None, :]  # (SUB, BLOCK_D)
            offs = (n * T + t)[:, None].to(tl.int64) * D + cols[None, :]
            x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
            o = tl.load(o_ptr + offs, mask=m, other=0.0).to(tl.float32)
            dxn = tl.load(dxn_ptr + offs, mask=m & HAS_DXN, other=0.0).to(tl.float32)  # 0 without dx_new
            mean = tl.sum(x, axis=1) / D
            xc = tl.where(m, x - mean[:, None], 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)  # (SUB,)
            xhat = xc * rstd[:, None]
            acc_shift += dy
            acc_scale += dy * xhat
            gh = dy * sc1[None, :]  # d loss / d xhat; LayerNorm's backward: rstd (gh - mean(gh) - xhat mean(gh xhat))
            dx = rstd[:, None] * (gh - (tl.sum(gh, axis=1) / D)[:, None]
                                  - xhat * (tl.sum(gh * xhat, axis=1) / D)[:, None]) + dxn
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=m)
            do = dx * g[None, :]
            tl.store(do_ptr + offs, do.to(do_ptr.dtype.element_ty), mask=m)
            if HAS_BIAS:
                acc_gate += dx * (o + bias[None, :])
                acc_bias += do
            else:
                acc_gate += dx * o
        base = (n * NB + b).to(tl.int64) * D + cols  # partial sums: (3 or 4, N, NB, D); plane = N * NB * D
        tl.store(part_ptr + base, tl.sum(acc_shift, axis=0), mask=cmask)
        tl.store(part_ptr + plane + base, tl.sum(acc_scale, axis=0), mask=cmask)
        tl.store(part_ptr + 2 * plane + base, tl.sum(acc_gate, axis=0), mask=cmask)
        if HAS_BIAS:
            tl.store(part_ptr + 3 * plane + base, tl.sum(acc_bias, axis=0), mask=cmask)

    @triton.jit
    def triton_dit_ln_mod_sums(part_ptr, dshift_ptr, dscale_ptr, dgate_ptr, dbias_ptr, N, NB, D, plane, CB,
                               BLOCK_NB: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
                               BLOCK_DB: tl.constexpr):
        # The backward's per-program partials -> the (N, D) column sums in their output dtype (the first N * CB
        # programs: image, BLOCK_D columns) and the bias gradient over all N * NB partial rows (the rest, launched
        # with a bias: BLOCK_DB columns each, so that enough programs share the long reduction). One launch where
        # torch took a reduction and a cast per output.
        pid = tl.program_id(0)
        if pid < N * CB:
            n = pid // CB
            cols = (pid % CB) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
            cmask = cols < D
            rows = tl.arange(0, BLOCK_NB)
            m = (rows < NB)[:, None] & cmask[None, :]  # (BLOCK_NB, BLOCK_D)
            offs = (n * NB + rows)[:, None].to(tl.int64) * D + cols[None, :]
            out = n * D + cols
            s = tl.sum(tl.load(part_ptr + offs, mask=m, other=0.0), axis=0)
            tl.store(dshift_ptr + out, s.to(dshift_ptr.dtype.element_ty), mask=cmask)
            s = tl.sum(tl.load(part_ptr + plane + offs, mask=m, other=0.0), axis=0)
            tl.store(dscale_ptr + out, s.to(dscale_ptr.dtype.element_ty), mask=cmask)
            s = tl.sum(tl.load(part_ptr + 2 * plane + offs, mask=m, other=0.0), axis=0)
            tl.store(dgate_ptr + out, s.to(dgate_ptr.dtype.element_ty), mask=cmask)
        else:
            # (names of their own: Triton wants a name to keep one shape across the two branches)
            bcols = (pid - N * CB) * BLOCK_DB + tl.arange(0, BLOCK_DB)  # (BLOCK_DB,)
            bmask = bcols < D
            acc = tl.zeros((BLOCK_R, BLOCK_DB), dtype=tl.float32)
            for r0 in tl.range(0, N * NB, BLOCK_R, num_stages=3):
                brows = r0 + tl.arange(0, BLOCK_R)
                bm = (brows < N * NB)[:, None] & bmask[None, :]
                acc += tl.load(part_ptr + 3 * plane + brows[:, None].to(tl.int64) * D + bcols[None, :], mask=bm,
                               other=0.0)
            tl.store(dbias_ptr + bcols, tl.sum(acc, axis=0).to(dbias_ptr.dtype.element_ty), mask=bmask)

    return triton, triton_dit_add_ln_modulate_bwd, triton_dit_ln_mod_sums


def _add_ln_mod_bwd_triton(x_new, o, gate, scale, dy, dx_new, eps, bias=None, sums_dtypes=(torch.float32,) * 3,
                           rows_per_program: int | None = None, num_warps: int | None = None, sub: int | None = None,
                           stages: int = 3):
    """Triton backward of ``add_layernorm_modulate``: one pass over the rows, column sums as per-program partials,
    then one small kernel that adds them up. -> (dx, do, dgate, dshift, dscale, dbias); dgate, dshift, dscale (N, D)
    in ``sums_dtypes`` (in that order), dbias (D,) in bias's dtype (None without a bias).

    Defaults from a sweep on an H100 (docs/benchmarks.md, run 14; ``scripts/check_kernels.py --parts backward``):
    DiT-XL's 1,152 channels one row per step, 32 tokens per program, 4 warps (0.140 ms at batch 64,
    2.4 TB/s; run 8's kernel 0.204); DiT-S's 384 channels two rows per step, 64 tokens per program, 8 warps (0.179 ms
    at batch 256; run 8's 0.216); three pipeline stages.
    """
    triton, kernel, sums_kernel = _triton_bwd()
    n, t, d = x_new.shape
    block_d = triton.next_power_of_2(d)
    if sub is None:
        sub = max(1, 1024 // block_d)  # rows per step: 1 for DiT-XL (2,048 lanes), 2 for DiT-S (512 lanes)
    if num_warps is None:
        num_warps = 8 if block_d <= 512 else 4
    rpp = triton.cdiv(max(rows_per_program or (32 if block_d > 512 else 64), sub), sub) * sub  # whole steps
    nb = triton.cdiv(t, rpp)
    dx = torch.empty_like(x_new)
    do = torch.empty_like(o)
    part = torch.empty(3 if bias is None else 4, n, nb, d, dtype=torch.float32, device=x_new.device)
    kernel[(n, nb)](x_new, o, dy, dx_new if dx_new is not None else x_new, gate, gate if bias is None else bias,
                    scale, dx, do, part, t, d, nb, n * nb * d, gate.stride(0), scale.stride(0), eps,
                    HAS_DXN=dx_new is not None, HAS_BIAS=bias is not None, BLOCK_D=block_d, SUB=sub, RPP=rpp,
                    STAGES=stages, num_warps=num_warps)
    dgate, dshift, dscale = (torch.empty(n, d, dtype=dt, device=x_new.device) for dt in sums_dtypes)
    dbias = None if bias is None else torch.empty(d, dtype=bias.dtype, device=x_new.device)
    cb, block_db = triton.cdiv(d, 128), 16
    programs = n * cb + (0 if bias is None else triton.cdiv(d, block_db))
    sums_kernel[(programs,)](part, dshift, dscale, dgate, dgate if dbias is None else dbias, n, nb, d, n * nb * d, cb,
                             BLOCK_NB=triton.next_power_of_2(nb), BLOCK_D=128, BLOCK_R=256, BLOCK_DB=block_db,
                             num_warps=4)
    return dx, do, dgate, dshift, dscale, dbias


@torch.library.custom_op("dit::add_layernorm_modulate_backward", mutates_args=())
def add_layernorm_modulate_backward(x_new: torch.Tensor, o: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                                    scale: torch.Tensor, dy: torch.Tensor, dx_new: torch.Tensor | None,
                                    eps: float, bias: torch.Tensor | None = None
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                               torch.Tensor]:
    """Gradients of ``add_layernorm_modulate`` from its saved ``x_new`` (the updated stream): dy (N, T, D) and
    dx_new (N, T, D) or None -> (dx (N, T, D) in x_new's dtype, do (N, T, D) in o's dtype, dgate, dshift, dscale
    (N, D) in their inputs' dtypes, dbias (D,) in bias's dtype: do's column sums; (0,) without a bias)."""
    for v, name in ((gate, "gate"), (scale, "scale")):
        if v.shape != (x_new.shape[0], x_new.shape[2]) or v.stride(1) != 1:
            raise ValueError(f"add_layernorm_modulate_backward: {name} must be (N, D) with unit column stride, got "
                             f"shape {tuple(v.shape)}, strides {v.stride()}")
    _check_bias("add_layernorm_modulate_backward", bias, x_new.shape[2])
    if _use_triton(x_new):  # every output written by the kernels in its dtype, each its own tensor
        dx, do, dgate, dshift, dscale, dbias = _add_ln_mod_bwd_triton(
            x_new.contiguous(), o.contiguous(), gate, scale, dy.contiguous(),
            dx_new.contiguous() if dx_new is not None else None, eps, bias, (gate.dtype, shift.dtype, scale.dtype))
        return dx, do, dgate, dshift, dscale, gate.new_empty(0) if bias is None else dbias
    dx, dshift, dscale = _ln_modulate_backward(x_new, shift, scale, eps, dy)
    if dx_new is not None:  # x' also continues along the residual stream
        dx = dx + dx_new.to(dx.dtype)
    acc = dx.dtype
    do = dx * gate.to(acc).unsqueeze(1)  # (N, T, D)
    dgate = (dx * (o.to(acc) if bias is None else o.to(acc) + bias.to(acc))).sum(1)  # (N, D)
    dbias = None if bias is None else do.sum((0, 1))  # (D,)
    # copy=True: the column sums may be views of one tensor, and a custom op's outputs must not alias each other
    # (with fp32 gates a plain .to would return them as they are)
    return (dx.to(x_new.dtype).contiguous(), do.to(o.dtype).contiguous(), dgate.to(gate.dtype, copy=True),
            dshift.to(shift.dtype, copy=True), dscale.to(scale.dtype, copy=True),
            gate.new_empty(0) if bias is None else dbias.to(bias.dtype, copy=True))


@add_layernorm_modulate_backward.register_fake
def _(x_new, o, gate, shift, scale, dy, dx_new, eps, bias=None):
    n, _, d = x_new.shape
    return (x_new.new_empty(x_new.shape), o.new_empty(o.shape), gate.new_empty(n, d), shift.new_empty(n, d),
            scale.new_empty(n, d), gate.new_empty(0) if bias is None else bias.new_empty(d))


def _add_ln_mod_setup(ctx, inputs, output):
    x, o, gate, shift, scale, eps, out_scale, out_dtype, bias = inputs
    ctx.save_for_backward(output[0], o, gate, shift, scale, bias)  # x' = x + gate * (o + bias): LayerNorm's input
    ctx.eps, ctx.out_dtype = eps, out_dtype


def _add_ln_mod_bwd(ctx, dx_new, dy):
    _check_differentiable("add_layernorm_modulate", ctx.out_dtype)
    x_new, o, gate, shift, scale, bias = ctx.saved_tensors
    # dx in x_new's dtype, which is x's (the residual update keeps the stream's dtype)
    dx, do, dgate, dshift, dscale, dbias = add_layernorm_modulate_backward(x_new, o, gate, shift, scale, dy, dx_new,
                                                                           ctx.eps, bias)
    return dx, do, dgate, dshift, dscale, None, None, None, (None if bias is None else dbias)


add_layernorm_modulate.register_autograd(_add_ln_mod_bwd, setup_context=_add_ln_mod_setup)


# ---- the attention's qkv gradient (training with DiT.fused_training) -------------------------------------------
# The attention backward returns dq, dk, dv as three (N, H, T, Dh) tensors, each dense in (N, T, H, Dh) order (the
# layout of its inputs, which are views of the qkv GEMM's output). The qkv linear's backward needs them as one
# (N*T, 3C) gradient: autograd copies them there and Inductor re-reads them for the bias gradient, two passes
# (98 + 56 us per DiT-S/2 block, docs/benchmarks.md, run 11). ``qkv_grad`` writes the gradient and the bias
# gradient's per-program column sums in one pass.


@functools.cache
def _triton_qkv():
    import triton
    import triton.language as tl

    @triton.jit
    def triton_dit_qkv_grad(src_ptr, out_ptr, part_ptr, M, C, out_col, ROWS: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_C: tl.constexpr):
        # src: (M, C) one of dq/dk/dv as tokens x features; out: (M, 3C) columns [out_col, out_col + C);
        # part: (programs along M, 3C) fp32 column sums of this program's rows
        pid_m = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)  # (BLOCK_C,); BLOCK_C divides C
        acc = tl.zeros((BLOCK_C,), tl.float32)
        for r in range(0, ROWS, BLOCK_M):
            rows = pid_m * ROWS + r + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
            m = (rows < M)[:, None]
            rows64 = rows[:, None].to(tl.int64)
            g = tl.load(src_ptr + rows64 * C + cols[None, :], mask=m, other=0.0)  # (BLOCK_M, BLOCK_C)
            tl.store(out_ptr + rows64 * (3 * C) + out_col + cols[None, :], g, mask=m)
            acc += tl.sum(g.to(tl.float32), axis=0)
        tl.store(part_ptr + pid_m * (3 * C) + out_col + cols, acc)

    return triton, triton_dit_qkv_grad


def _qkv_block_c(c: int) -> int | None:
    """Column tile of the qkv-gradient kernel: must divide the width (every DiT's: 384, 768, 1024, 1152)."""
    return next((b for b in (128, 64, 32) if c % b == 0), None)


def _qkv_grad_triton(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, rows_per_program: int | None = None,
                     block_m: int = 64, num_warps: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    triton, kernel = _triton_qkv()
    n, h, t, dh = dq.shape
    c, m = h * dh, n * t
    block_c = _qkv_block_c(c)
    if rows_per_program is None:
        # the sweep's best (scripts/check_kernels.py --parts qkv; docs/benchmarks.md, run 11): 512 rows per program
        # for DiT-S/2 (0.138 ms), 256 for XL/2 (0.108 ms), where 512 leaves too few programs (0.283 ms)
        rows_per_program = 512 if triton.cdiv(m, 512) * (c // block_c) >= 384 else 256
    out = torch.empty(m, 3 * c, dtype=dq.dtype, device=dq.device)
    grid_m = triton.cdiv(m, rows_per_program)
    part = torch.empty(grid_m, 3 * c, dtype=torch.float32, device=dq.device)
    for i, g in enumerate((dq, dk, dv)):
        src = g.transpose(1, 2)  # (N, T, H, Dh): free for the attention backward's outputs
        if not src.is_contiguous():
            src = src.contiguous()
        kernel[(grid_m, c // block_c)](src, out, part, m, c, i * c, ROWS=rows_per_program, BLOCK_M=block_m,
                                       BLOCK_C=block_c, num_warps=num_warps)
    return out, part.sum(0).to(dq.dtype)


@torch.library.custom_op("dit::qkv_grad", mutates_args=())
def qkv_grad(dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The qkv GEMM's output gradient and its bias gradient from the attention's q, k, v gradients.

    dq, dk, dv: (N, H, T, Dh) -> (N*T, 3*H*Dh) in the qkv output's (N, T, 3, H, Dh) layout, and its column sums
    (3*H*Dh,), both in dq's dtype (the sums accumulate in fp32). One Triton pass on CUDA.
    """
    n, h, t, dh = dq.shape
    if _use_triton(dq) and _qkv_block_c(h * dh) is not None:
        return _qkv_grad_triton(dq, dk, dv)
    g = torch.stack([dq, dk, dv]).permute(1, 3, 0, 2, 4).reshape(n * t, 3 * h * dh)  # (M, 3C)
    return g.contiguous(), g.sum(0, dtype=_acc(g)).to(dq.dtype)


@qkv_grad.register_fake
def _(dq, dk, dv):
    n, h, t, dh = dq.shape
    return dq.new_empty(n * t, 3 * h * dh), dq.new_empty(3 * h * dh)
