"""The DiT blocks' training GEMMs on QuACK's Hopper kernels: an optional GEMM backend (``model.gemm_backend=quack``,
``DiT.set_gemm_backend``).

QuACK (``pip install quack-kernels``) writes its GEMMs in NVIDIA's CuTe DSL: persistent, warp-specialised
ping-pong kernels with TMA loads and stores and the bias / GELU / GELU-derivative in the epilogue. At DiT-XL/2's
shapes on an H100 they ran the qkv forward GEMM (with its bias) at 760 TFLOP/s against cuBLAS's 647, the qkv input
gradient at 786 against 646 and fc2's forward at 743 against 688 (docs/benchmarks.md, run 20). The weight
gradients stay cuBLAS's: QuACK's default tile has no split-K, and the weight gradients reduce over N * T rows
(DiT-S/2's ran at 170-180 TFLOP/s against cuBLAS's 650-670).

Each GEMM is a ``torch.library`` custom op, so ``torch.compile`` calls it as one opaque kernel; where QuACK cannot
run it (CPU, a dtype other than bf16/fp16, sizes that break its 16-byte TMA alignment) the op computes the same
formula with torch, which is also what the CPU tests check. QuACK compiles each kernel on its first call (a few
seconds; cached on disk by QuACK afterwards) and uses its default tile configuration (``tuned=False``: its
autotuner, which times with a cold L2, picked slower tiles for this step than the default in run 20).
"""

from __future__ import annotations

import functools
import importlib

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from .kernels import _acc, linear_gelu_ref

BACKENDS = ("cublas", "quack")
_DTYPES = (torch.bfloat16, torch.float16)


@functools.cache
def _quack():
    """QuACK's GEMM interface module, or the ImportError's message."""
    try:
        return importlib.import_module("quack.gemm_interface")
    except Exception as exc:  # noqa: BLE001 - a broken install (CuTe DSL libraries) is as unusable as a missing one
        return f"{type(exc).__name__}: {exc}"


def unavailable_reason(device: torch.device | str) -> str | None:
    """None where QuACK's GEMMs can run on ``device``, else a one-line reason."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"QuACK's GEMMs need a CUDA GPU, the model is on {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 9:
        return f"QuACK's GEMMs need compute capability 9.0 or newer (Hopper), this GPU has {major}.{minor}"
    mod = _quack()
    if isinstance(mod, str):
        return f"the quack-kernels package does not import ({mod}); install it with `pip install quack-kernels`"
    return None


def check_backend(name: str, device: torch.device | str | None = None) -> None:
    """Raise a one-line ValueError unless ``name`` is a GEMM backend that can run on ``device`` (without a device:
    unless it is one of ``BACKENDS``)."""
    if name not in BACKENDS:
        raise ValueError(f"gemm backend {name!r}: expected one of {', '.join(BACKENDS)}")
    if name == "quack" and device is not None:
        reason = unavailable_reason(device)
        if reason is not None:
            raise ValueError(f"gemm backend 'quack': {reason}")


def _runs(*tensors: torch.Tensor) -> bool:
    """Whether QuACK takes these operands: CUDA, one 16-bit float dtype, rows 16-byte aligned (TMA)."""
    x = tensors[0]
    if not (x.is_cuda and x.dtype in _DTYPES) or isinstance(_quack(), str):
        return False
    for t in tensors:
        if t.dtype != x.dtype or t.stride(-1) != 1 or t.shape[-1] % 8 or (t.dim() > 1 and t.stride(-2) % 8):
            return False
    return True


@torch.library.custom_op("dit::quack_linear", mutates_args=())
def quack_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight^T + bias``: x (M, K), weight (N, K), bias (N,) or None -> (M, N) in x's dtype; fp32 accumulation,
    the bias added to the accumulator in the epilogue."""
    if _runs(x, weight) and (bias is None or bias.dtype == x.dtype):
        return _quack().gemm(x, weight.t(), bias=bias, tuned=False)  # B = weight^T: (K, N), K-major
    return x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())


@quack_linear.register_fake
def _(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("dit::quack_mm", mutates_args=())
def quack_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b``: a (M, K), b (K, N) -> (M, N) in a's dtype, fp32 accumulation (the input gradients ``dy @ W``)."""
    if _runs(a, b):
        return _quack().gemm(a, b, tuned=False)
    return a @ b


@quack_mm.register_fake
def _(a, b):
    return a.new_empty(a.shape[0], b.shape[1])


@torch.library.custom_op("dit::quack_gemm_gelu_aux", mutates_args=())
def quack_gemm_gelu_aux(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x @ weight^T + bias``, ``g = GELU_tanh(h)``; returns (g, h) in x's dtype (as
    ``cublaslt.gemm_gelu_aux``): x (M, K), weight (N, K), bias (N,) -> (M, N), (M, N). The GELU is applied to the
    fp32 accumulator in the GEMM's epilogue, which stores both."""
    if _runs(x, weight, bias):
        h, g = _quack().gemm_act(x, weight.t(), bias=bias, activation="gelu_tanh_approx", store_preact=True,
                                 tuned=False)
        return g, h
    return linear_gelu_ref(x, weight, bias)


@quack_gemm_gelu_aux.register_fake
def _(x, weight, bias):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], weight.shape[0])


@torch.library.custom_op("dit::quack_gemm_dgelu", mutates_args=())
def quack_gemm_dgelu(grad: torch.Tensor, weight: torch.Tensor, pre: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The GELU's input gradient through the next linear layer and the GELU itself, recomputed:
    ``dh = (grad @ weight) * GELU_tanh'(pre)``, ``g = GELU_tanh(pre)``.

    grad: (M, K) the next layer's output gradient; weight: (K, N) its weight; pre: (M, N) the saved pre-activation
    -> (M, N), (M, N) in grad's dtype. QuACK's epilogue writes both; ``g`` feeds the next layer's weight gradient,
    so the forward need not keep the activation."""
    if _runs(grad, weight, pre):
        dh, g = _quack().gemm_dact(grad, weight, PreAct=pre, activation="gelu_tanh_approx", tuned=False)
        return dh, g
    acc = _acc(grad)
    dg = grad.to(acc) @ weight.to(acc)  # (M, N)
    pre_acc = pre.to(acc)
    dh = torch.ops.aten.gelu_backward(dg, pre_acc, approximate="tanh")  # (M, N)
    return dh.to(grad.dtype), F.gelu(pre_acc, approximate="tanh").to(grad.dtype)


@quack_gemm_dgelu.register_fake
def _(grad, weight, pre):
    return grad.new_empty(grad.shape[0], weight.shape[1]), grad.new_empty(grad.shape[0], weight.shape[1])


@register_flop_formula(torch.ops.dit.quack_linear)
def _quack_linear_flops(x_shape, w_shape, *args, **kwargs) -> int:
    return 2 * x_shape[0] * x_shape[1] * w_shape[0]  # (M, K) x (K, N)


@register_flop_formula(torch.ops.dit.quack_mm)
def _quack_mm_flops(a_shape, b_shape, *args, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


@register_flop_formula(torch.ops.dit.quack_gemm_gelu_aux)
def _quack_gelu_aux_flops(x_shape, w_shape, *args, **kwargs) -> int:
    return 2 * x_shape[0] * x_shape[1] * w_shape[0]  # the epilogue is not counted


@register_flop_formula(torch.ops.dit.quack_gemm_dgelu)
def _quack_dgelu_flops(g_shape, w_shape, *args, **kwargs) -> int:
    return 2 * g_shape[0] * g_shape[1] * w_shape[1]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, backend: str) -> torch.Tensor:
    """``x @ weight^T + bias`` (x (M, K), weight (N, K), bias (N,) or None -> (M, N)) on ``backend``'s GEMM:
    torch's (cuBLAS, which Inductor can fuse around) or QuACK's custom op."""
    if backend == "quack":
        return quack_linear(x, weight, bias)
    return x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())


def mm(a: torch.Tensor, b: torch.Tensor, backend: str) -> torch.Tensor:
    """``a @ b`` (a (M, K), b (K, N) -> (M, N)) on ``backend``'s GEMM."""
    return quack_mm(a, b) if backend == "quack" else a @ b
