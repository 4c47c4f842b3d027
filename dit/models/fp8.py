"""FP8 linear layers: the large GEMMs of a DiT block on the FP8 tensor cores (Hopper and later).

``Float8Linear`` is an ``nn.Linear`` (same parameters, same state-dict keys) whose matmuls, forward and backward, run
through ``torch._scaled_mm`` with dynamic per-tensor scaling, the "tensorwise" recipe of Micikevicius et al. 2022
("FP8 Formats for Deep Learning"): activations and weights in E4M3 (more mantissa), gradients in E5M2 (more range),
each tensor scaled so that its absolute maximum maps to the format's largest finite value. The fp32 master weights,
the optimizer and everything outside these matmuls are unchanged. Under ``torch.compile`` the amax reductions and
casts fuse into the neighbouring kernels.

``recipe="rowwise"`` (training) scales each row of every FP8 operand on its own, along the GEMM's reduction
dimension, and keeps E4M3 for the gradients too (per-row scales leave E5M2's extra range unneeded), as torchao's
rowwise recipe does. Its weight-gradient GEMM stays in the compute dtype (bf16 under autocast): an FP8 weight
gradient needs the activation and the gradient cast again in transposed copies (tokens contiguous), the traffic that
made the tensorwise recipe slower than bf16 at DiT widths (docs/benchmarks.md, run 6). The activations and gradients
are cast by one Triton pass per tensor (``dit.models.kernels.rowwise_fp8``, opaque to Inductor, which fused the row
reductions into the GELU kernels at a quarter of their speed). DiT-XL/2 trains 1.045x faster than in bf16 on an
H100 (555 vs 531 img/s), DiT-S/2 0.93x (docs/benchmarks.md, run 10): the trainer's ``model.fp8_training``.

For inference, ``calibrate_float8`` fixes each layer's activation scale from the largest input seen on calibration
batches and casts the weights once ("static" scaling, as post-training quantisation does): the cast then needs no
amax pass and fuses into the kernel that produces the activation.

FP8 rounds each operand to 3 (E4M3) or 2 (E5M2) mantissa bits. The output error against fp32 is about twice bf16's at
random weights (DiT-XL/2: 6.8e-3 vs 3.5e-3) and 4-5x on a trained model (docs/benchmarks.md, run 6). An opt-in,
never a default. Where it pays:
sampling with static scales (1.34x per DiT-XL/2 step on an H100 with fast accumulation and the fused kernels of
``dit.models.kernels``); training at DiT-XL/2's width with the rowwise recipe (1.045x); not the tensorwise recipe
(its casts and transposes cost more than the faster GEMMs save) nor any recipe at DiT-S's width.
"""

from __future__ import annotations

import fnmatch

import torch
import torch.nn.functional as F
from torch import nn

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2

# Linear layers of a DiT block that are converted by default: the four GEMMs that hold nearly all of its FLOPs. The
# adaLN modulation (M = batch) and the embedders are tiny GEMMs where the casts would cost more than they save.
# (fnmatch patterns of qualified module names; a UNet's attention layers are not matched: its FLOPs are convolutions)
DIT_BLOCK_LINEARS = ("blocks.*.attn.qkv", "blocks.*.attn.proj", "blocks.*.mlp.fc1", "blocks.*.mlp.fc2")


def saturating_cast(x: torch.Tensor, scale: float | torch.Tensor, dtype: torch.dtype = E4M3) -> torch.Tensor:
    """``x * scale`` in the FP8 ``dtype``, clamped to the format's largest finite value (no inf/nan from values
    beyond a calibrated range). Shape unchanged."""
    fmax = torch.finfo(dtype).max
    return (x * scale).clamp(-fmax, fmax).to(dtype)


RECIPES = ("tensorwise", "rowwise")


def to_float8(x: torch.Tensor, dtype: torch.dtype, dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic scaling: ``x`` -> (``x * s`` in ``dtype``, ``1 / s``) with ``s = fp8_max / amax(|x|)``.

    ``dim=None``: one scale for the whole tensor (0-d). ``dim=d``: the amax over dimension ``d`` only, one scale per
    slice (kept as a size-1 dimension): for an (R, C) matrix ``dim=-1`` gives (R, 1) row scales, ``dim=0`` (1, C)
    column scales. The returned inverse scale (float32) is what ``torch._scaled_mm`` multiplies the product by.
    """
    fmax = torch.finfo(dtype).max
    a = x.detach().abs()
    amax = a.amax() if dim is None else a.amax(dim=dim, keepdim=True)
    amax = amax.float().clamp_min(1e-12)  # all-zero rows: any finite scale works
    scale = fmax / amax
    x8 = saturating_cast(x.float(), scale, dtype)
    return x8, scale.reciprocal()


def _col_major(t: torch.Tensor) -> torch.Tensor:
    """The same (R, C) matrix stored column-major (what ``_scaled_mm`` needs for its second operand)."""
    return t.t().contiguous().t()


def _scaled_mm(a, b, sa, sb, out_dtype, bias=None, fast_accum: bool = False):
    """(M, K) row-major x (K, N) column-major -> (M, N) in ``out_dtype``, scales applied in fp32.

    ``fast_accum``: Hopper's FP8 tensor-core accumulation without the periodic promotion of partial sums to fp32
    registers (faster; its rounding is far below E4M3's). Used for the inference GEMMs only, as torchao does for
    forward outputs; gradients keep the promoted accumulation.
    """
    if bias is not None and out_dtype == torch.float32:  # cuBLASLt takes no bias with an fp32 output
        return torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=out_dtype,
                                use_fast_accum=fast_accum) + bias.float()
    return torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, bias=bias, out_dtype=out_dtype, use_fast_accum=fast_accum)


class _Float8Matmul(torch.autograd.Function):
    """``x @ weight^T + bias`` with every GEMM in FP8, per-tensor scales: forward E4M3 x E4M3, backward E5M2
    gradients x E4M3 (``recipe="tensorwise"``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype):
        """x: (M, K); weight: (N, K); bias: (N,) or None -> (M, N) in out_dtype."""
        x8, sx = to_float8(x, E4M3)  # (M, K)
        w8, sw = to_float8(weight, E4M3)  # (N, K)
        b = None if bias is None else bias.to(out_dtype)
        out = _scaled_mm(x8, w8.t(), sx, sw, out_dtype, b)  # (M, N)
        ctx.save_for_backward(x8, w8, sx, sw)
        ctx.x_dtype, ctx.w_dtype, ctx.has_bias = x.dtype, weight.dtype, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x8, w8, sx, sw = ctx.saved_tensors
        g8, sg = to_float8(grad, E5M2)  # (M, N)
        grad_x = _scaled_mm(g8, _col_major(w8), sg, sw, ctx.x_dtype)  # (M, N) x (N, K) -> (M, K)
        # The weight gradient comes out in fp32 (the master weights' dtype under autocast) straight from the GEMM.
        grad_w = _scaled_mm(g8.t().contiguous(), _col_major(x8), sg, sx, torch.float32)  # (N, M) x (M, K) -> (N, K)
        grad_b = grad.float().sum(0) if ctx.has_bias else None  # (N,)
        return grad_x, grad_w.to(ctx.w_dtype), grad_b, None


class _Float8MatmulRowwise(torch.autograd.Function):
    """``x @ weight^T + bias`` with per-row scales (``recipe="rowwise"``): the forward and the input-gradient GEMMs in
    E4M3 x E4M3, each operand scaled per row of its reduction dimension; the weight-gradient GEMM in ``x``'s
    compute dtype, from the unquantised operands."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype):
        """x: (M, K); weight: (N, K); bias: (N,) or None -> (M, N) in out_dtype."""
        from .kernels import rowwise_fp8  # (here: kernels imports this module)

        x8, sx = rowwise_fp8(x)  # (M, K), (M, 1): one scale per token
        w8, sw = to_float8(weight, E4M3, dim=-1)  # (N, K), (N, 1): one scale per output feature
        # Per-row scaled GEMMs produce bf16 on CUDA (CUTLASS rowwise kernel), whatever the caller computes in. The
        # forward accumulates fast (no fp32 promotion of partial sums), as torchao's recipes do for the output GEMM.
        b = None if bias is None else bias.to(torch.bfloat16)
        out = _scaled_mm(x8, w8.t(), sx, sw.t(), torch.bfloat16, b, fast_accum=True)  # (M, N)
        # Only a real cast: returning ``out.to(out.dtype)`` (the tensor itself) made torch.compile (torch 2.11, CUDA)
        # drop the backward of the scaled_dot_product_attention that consumes the qkv output, so every gradient
        # upstream of the attention came out zero (caught by tests/test_fp8.py's GPU test; cf. pytorch/pytorch#159299).
        if out_dtype != out.dtype:
            out = out.to(out_dtype)
        ctx.save_for_backward(x.to(out_dtype), weight)  # the weight gradient's operand; the weight is re-cast
        ctx.x_dtype, ctx.has_bias = x.dtype, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x_hp, weight = ctx.saved_tensors
        from .kernels import rowwise_fp8

        g8, sg = rowwise_fp8(grad)  # (M, N), (M, 1)
        wc8, swc = to_float8(weight, E4M3, dim=0)  # (N, K), (1, K): one scale per input feature, over N
        grad_x = _scaled_mm(g8, _col_major(wc8), sg, swc, torch.bfloat16).to(ctx.x_dtype)  # (M, K)
        grad_w = (grad.to(x_hp.dtype).t() @ x_hp).to(weight.dtype)  # (N, M) x (M, K) -> (N, K), high precision
        grad_b = grad.float().sum(0) if ctx.has_bias else None  # (N,)
        return grad_x, grad_w, grad_b, None


class Float8Linear(nn.Linear):
    """``nn.Linear`` computed with FP8 GEMMs (``_Float8Matmul`` / ``_Float8MatmulRowwise`` by ``recipe``); same
    parameters and state-dict keys.

    Falls back to the plain linear when a dimension is not a multiple of 16 (an FP8 tensor-core requirement). Under
    autocast the output has the autocast dtype, as ``nn.Linear``'s would; otherwise the input's dtype. ``recipe``
    picks the training scaling (``RECIPES``, module docstring); inference with static scales is the same for both.
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: str = "tensorwise") -> "Float8Linear":
        """A Float8Linear that shares ``linear``'s parameter tensors (no copy; an optimizer over them stays valid)."""
        if recipe not in RECIPES:
            raise ValueError(f"FP8 recipe {recipe!r}: expected one of {', '.join(RECIPES)}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        new.recipe = recipe
        new.clear_static_scales()
        return new

    def clear_static_scales(self) -> None:
        """Back to dynamic scaling (drops what ``calibrate_float8`` set)."""
        self.input_scale: float | None = None  # static activation scale fp8_max / amax (inference)
        self.fast_accum = True  # inference GEMMs (static scales) accumulate without fp32 promotion (_scaled_mm)
        # non-persistent: the state dict keeps exactly nn.Linear's keys
        self.register_buffer("weight8", None, persistent=False)  # (N, K) E4M3, cast once
        self.register_buffer("weight_scale_inv", None, persistent=False)  # () float32
        self.register_buffer("input_scale_inv", None, persistent=False)  # () float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features)."""
        k, n = self.in_features, self.out_features
        rows = x.numel() // k if k else 0
        if k % 16 or n % 16 or rows % 16 or rows == 0:
            return F.linear(x, self.weight, self.bias)
        dev = x.device.type
        autocast = dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev)
        out_dtype = torch.get_autocast_dtype(dev) if autocast else x.dtype
        if self.input_scale is not None and not torch.is_grad_enabled():
            return self.forward_float8(self.quantize_input(x), out_dtype)
        fn = _Float8MatmulRowwise if self.recipe == "rowwise" else _Float8Matmul
        with torch.autocast(dev, enabled=False):
            y = fn.apply(x.reshape(-1, k), self.weight, self.bias, out_dtype)  # (M, N)
        return y.view(*x.shape[:-1], n)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Static scaling (after ``calibrate_float8``): ``x * input_scale`` in E4M3, no amax pass; inputs beyond the
        calibrated range saturate at the format's maximum. (..., K) -> (..., K) E4M3."""
        return saturating_cast(x.float(), self.input_scale)

    def forward_float8(self, x8: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """The static-scale GEMM on an input already cast by ``quantize_input`` (or by a fused kernel with the same
        ``input_scale``, ``dit.models.kernels``). x8: (..., K) E4M3 -> (..., N) in ``out_dtype``."""
        b = None if self.bias is None else self.bias.to(out_dtype)
        y = _scaled_mm(x8.reshape(-1, self.in_features), self.weight8.t(), self.input_scale_inv,
                       self.weight_scale_inv, out_dtype, b, fast_accum=self.fast_accum)  # (M, N)
        return y.view(*x8.shape[:-1], self.out_features)


def convert_to_float8(model: nn.Module, names: tuple[str, ...] = DIT_BLOCK_LINEARS, recipe: str = "tensorwise") -> int:
    """Replace every ``nn.Linear`` whose qualified name matches one of the fnmatch patterns ``names`` by a
    ``Float8Linear`` (training ``recipe``) sharing its parameters, in place. Returns how many were converted (0: none
    matched, a UNet)."""
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) is nn.Linear and any(fnmatch.fnmatchcase(name, pat) for pat in names)]
    for name, m in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Float8Linear.from_linear(m, recipe))
    return len(targets)


@torch.no_grad()
def calibrate_float8(model: nn.Module, run_batches, margin: float = 1.0) -> int:
    """Static FP8 scales for inference: call ``run_batches()`` (forward passes over representative inputs, e.g. noisy
    latents at timesteps spread over the schedule), record each ``Float8Linear``'s largest input magnitude, and fix
    its activation scale to ``fp8_max / (margin * amax)``; the weights are cast to E4M3 once. Returns the number of
    layers calibrated. The weights must not change afterwards (``clear_static_scales`` undoes it); training
    (autograd on) always scales dynamically.
    """
    layers = [m for m in model.modules() if isinstance(m, Float8Linear)]
    amax: dict[Float8Linear, torch.Tensor] = {}

    def hook(mod, args):
        a = args[0].detach().abs().amax().float()
        amax[mod] = torch.maximum(amax[mod], a) if mod in amax else a

    for m in layers:
        m.clear_static_scales()
    handles = [m.register_forward_pre_hook(hook) for m in layers]
    try:
        run_batches()
    finally:
        for h in handles:
            h.remove()
    fmax = torch.finfo(E4M3).max
    for m in layers:
        if m not in amax:
            continue  # not reached by the calibration batches: stays dynamic
        scale = fmax / max(margin * amax[m].item(), 1e-12)
        m.input_scale = scale
        m.input_scale_inv = torch.tensor(1.0 / scale, dtype=torch.float32, device=m.weight.device)
        m.weight8, m.weight_scale_inv = to_float8(m.weight, E4M3)
    return len(amax)
