"""Building blocks shared by the DiT and the UNet baseline.

Module and parameter names follow facebookresearch/DiT (which uses timm's ``Attention``/``Mlp``), so the official
checkpoints load with strict keys: ``t_embedder.mlp.0``, ``y_embedder.embedding_table``, ``attn.qkv``, ``attn.proj``,
``mlp.fc1``, ``mlp.fc2``.
"""

from __future__ import annotations

import math
import types
from collections import Counter
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import register_flop_formula

from . import quack_gemm
from .attention_kernels import fused_attention_supported, qkv_attention
from .cublaslt import fused_mlp
from .fp8 import E4M3
from .kernels import _acc, gelu_tanh_fp8, qkv_grad, weight_grad


def compile_regions(modules: Iterable[nn.Module], methods: tuple[str, ...] = ("forward",), **compile_kw) -> int:
    """Regional compilation: ``torch.compile`` each repeated block instead of the whole network.

    For every module type among ``modules``, each method in ``methods`` is compiled once, as the class's function, and
    bound to every instance of that type. Dynamo caches compiled graphs per function and guards on input shapes, not
    on the module's identity, so identical blocks (a DiT's 28) share one graph and compilation costs one block's time.
    ``__call__`` is untouched: module hooks still run, outside the compiled region. ``compile_kw`` go to
    ``torch.compile``. Returns the number of modules.

    Each distinct input shape of a function is one cached graph (a UNet's blocks see several widths and resolutions),
    so dynamo's per-function limit on cached graphs (``recompile_limit``, 8 by default; past it the function runs
    eagerly) is raised to the number of instances of the most frequent type.
    """
    modules = list(modules)
    compiled: dict[tuple[type, str], object] = {}
    for module in modules:
        for name in methods:
            key = (type(module), name)
            if key not in compiled:
                compiled[key] = torch.compile(getattr(type(module), name), **compile_kw)
            setattr(module, name, types.MethodType(compiled[key], module))
    if modules:
        config = torch._dynamo.config
        attr = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
        most = max(Counter(type(m) for m in modules).values())
        setattr(config, attr, max(getattr(config, attr), most))
    return len(modules)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation ``x * (1 + scale) + shift`` (DiT paper, Sec. 3.2).

    x: (N, T, D); shift, scale: (N, D).
    """
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


def timestep_embedding(
    t: torch.Tensor, dim: int, max_period: float = 10000.0, downscale_freq_shift: float = 0.0
) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, ``[cos(t w_i), sin(t w_i)]``.

    ``w_i = max_period ** (-i / (dim // 2 - downscale_freq_shift))`` for ``i < dim // 2`` (Transformer / ADM / DiT
    convention: cos first, shift 0; diffusers' DiT port uses shift 1, which changes every frequency but the first).
    t: (N,) -> (N, dim), float32.
    """
    half = dim // 2
    denom = half - downscale_freq_shift
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / denom)
    args = t[:, None].float() * freqs[None]  # (N, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (N, 2 * half)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> vectors: sinusoidal features followed by a two-layer SiLU MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, downscale_freq_shift: float = 0.0):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.downscale_freq_shift = downscale_freq_shift
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t: (N,) -> (N, hidden_size)."""
        t_freq = timestep_embedding(
            t, self.frequency_embedding_size, downscale_freq_shift=self.downscale_freq_shift
        )  # (N, F)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> vectors, with one extra "null" class (index ``num_classes``) for classifier-free guidance.

    In training, each label is replaced by the null class with probability ``dropout_prob`` (label dropout).
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + int(use_cfg_embedding), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids == 1
        return torch.where(drop_ids, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        """labels: (N,) int64 in [0, num_classes] (num_classes = null) -> (N, hidden_size)."""
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


def sincos_1d(pos: torch.Tensor, dim: int) -> torch.Tensor:
    """1-D sine-cosine position features ``[sin(p w), cos(p w)]``, ``w_i = 10000 ** (-i / (dim / 2))``.

    pos: (M,) float64 -> (M, dim) float64.
    """
    assert dim % 2 == 0, "sincos dimension must be even"
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.double()[:, None] * omega[None]  # (M, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding of a ``grid_size x grid_size`` token grid (MAE / DiT).

    Token ``k = i * grid_size + j`` (row i, column j) gets ``[sincos(j), sincos(i)]`` (the official code's meshgrid
    puts the column index first). Returns (grid_size**2, embed_dim) float64.
    """
    assert embed_dim % 4 == 0, "2-D sincos embedding needs embed_dim divisible by 4"
    i, j = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    emb_col = sincos_1d(j.reshape(-1), embed_dim // 2)
    emb_row = sincos_1d(i.reshape(-1), embed_dim // 2)
    return torch.cat([emb_col, emb_row], dim=1)


class _QKVProjection(torch.autograd.Function):
    """``x @ W^T + b`` split into q, k, v (N, H, T, Dh) views. The backward builds the GEMM's output gradient and the
    bias gradient from dq, dk, dv in one pass (``kernels.qkv_grad``) instead of autograd's copy and a second read."""

    @staticmethod
    def forward(ctx, x, weight, bias, n: int, heads: int):
        """x: (N*T, D); weight: (3D, D); bias: (3D,) -> q, k, v, each (N, H, T, D / H)."""
        qkv = torch.addmm(bias, x, weight.t())  # (N*T, 3D)
        ctx.save_for_backward(x, weight)
        return qkv.view(n, x.shape[0] // n, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        x, weight = ctx.saved_tensors
        dqkv, db = qkv_grad(dq, dk, dv)  # (N*T, 3D), (3D,)
        return dqkv @ weight, dqkv.t() @ x, db, None, None


def compute_weight(linear: nn.Module, dtype: torch.dtype) -> torch.Tensor | None:
    """``linear``'s weight as the optimizer keeps it in the compute dtype ``dtype`` (its ``weight_c`` buffer,
    ``DiT.set_compute_weights``), or None where it keeps none in that dtype (the layer then casts its weight)."""
    w = getattr(linear, "weight_c", None)
    return w if w is not None and w.dtype == dtype else None


class _MasterLinear(torch.autograd.Function):
    """``x @ weight^T + bias`` for x in the compute dtype and parameters in their own (fp32 master weights): the
    weight and bias gradients come back in the parameters' dtype straight from the GEMM (``kernels.weight_grad``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, weight_c, backend: str):
        """x: (M, K); weight: (N, K); bias: (N,); weight_c: the weight in x's dtype, or None to cast it here;
        backend: the forward and input-gradient GEMMs' (``quack_gemm.BACKENDS``)."""
        wc = weight.to(x.dtype) if weight_c is None else weight_c
        ctx.save_for_backward(x, wc)
        ctx.dtypes, ctx.backend = (weight.dtype, None if bias is None else bias.dtype), backend
        return quack_gemm.linear(x, wc, None if bias is None else bias.to(x.dtype), backend)  # (M, N)

    @staticmethod
    def backward(ctx, dy):
        x, wc = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        db = None if b_dtype is None else dy.sum(0, dtype=_acc(dy)).to(b_dtype)
        return quack_gemm.mm(dy, wc, ctx.backend), weight_grad(dy, x, w_dtype), db, None, None


def master_linear(x: torch.Tensor, linear: nn.Linear, dtype: torch.dtype, backend: str = "cublas",
                  bias: bool = True) -> torch.Tensor:
    """``linear(x)`` computed in ``dtype`` (the autocast dtype), for training: x (..., K) -> (..., N) in ``dtype``.

    Same values as autocast's ``F.linear``; the weight and bias gradients are written in the parameters' dtype by
    the GEMM itself instead of cast from ``dtype`` afterwards, and the weight's cast is the optimizer's copy where
    it keeps one (``compute_weight``). ``backend``: the forward and input-gradient GEMMs' (``quack_gemm``).
    ``bias=False`` leaves ``linear.bias`` out (the caller adds it, and its gradient comes from there)."""
    y = _MasterLinear.apply(x.reshape(-1, x.shape[-1]).to(dtype), linear.weight, linear.bias if bias else None,
                            compute_weight(linear, dtype), backend)
    return y.view(*x.shape[:-1], y.shape[-1])


class Attention(nn.Module):
    """Multi-head self-attention with one fused QKV projection, through ``F.scaled_dot_product_attention``.

    ``fused_qkv_backward = True`` (``DiT.set_fused_qkv_backward``; the trainer's ``model.fused_qkv_backward``): in
    training, the qkv projection's backward assembles its gradient and the bias gradient in one pass
    (``_QKVProjection``). ``fused_attention = True`` (``DiT.set_fused_attention``; the trainer's
    ``model.fused_attention``): in training, the qkv projection and the attention run through
    ``attention_kernels.qkv_attention`` (cuDNN's forward, a Triton backward that writes the packed qkv gradient and
    the bias gradient's pieces), at the head dims it takes (``fused_attention_supported``). On that path
    ``gemm_backend`` (``DiT.set_gemm_backend``) picks the qkv and proj GEMMs' backend (``quack_gemm.BACKENDS``).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        assert dim % num_heads == 0, f"hidden size {dim} is not divisible by num_heads {num_heads}"
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.fused_qkv_backward = False
        self.fused_attention = False
        self.gemm_backend = "cublas"

    def _fused_path(self, x: torch.Tensor) -> bool:
        return (self.fused_attention and torch.is_grad_enabled() and x.dtype != E4M3 and type(self.qkv) is nn.Linear
                and self.qkv.bias is not None and fused_attention_supported(self.head_dim))

    def _fused_attend(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
        dtype = compute_dtype(x.device, self.qkv.weight.dtype)  # autocast does not reach the custom ops
        out = qkv_attention(x.to(dtype), self.qkv.weight, self.qkv.bias, self.num_heads,
                            compute_weight(self.qkv, dtype), self.gemm_backend)  # (N, T, D)
        return out, dtype

    def forward_split_bias(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``forward`` with the output projection's bias left for the caller to add: x (N, T, D) -> (y (N, T, D),
        bias (D,)), ``y + bias`` = ``forward(x)``; bias None where it is already in y (off the fused path).

        The caller adds the bias in the kernel that consumes y (``kernels.add_layernorm_modulate``), whose backward
        gives its gradient from the pass it makes anyway: one pass fewer over the (N*T, D) output gradient."""
        if self._fused_path(x) and type(self.proj) is nn.Linear and self.proj.bias is not None:
            out, dtype = self._fused_attend(x)
            return master_linear(out, self.proj, dtype, self.gemm_backend, bias=False), self.proj.bias
        return self(x), None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, T, D) -> (N, T, D)."""
        n, t, d = x.shape
        if self._fused_path(x):
            out, dtype = self._fused_attend(x)
            if type(self.proj) is nn.Linear:
                return master_linear(out, self.proj, dtype, self.gemm_backend)
            return self.proj(out)
        if (self.fused_qkv_backward and torch.is_grad_enabled() and x.dtype != E4M3 and type(self.qkv) is nn.Linear
                and self.qkv.bias is not None):
            dtype = compute_dtype(x.device, self.qkv.weight.dtype)  # autocast does not reach the custom op
            q, k, v = _QKVProjection.apply(x.reshape(n * t, d).to(dtype), self.qkv.weight.to(dtype),
                                           self.qkv.bias.to(dtype), n, self.num_heads)  # (N, H, T, Dh) each
        else:
            if x.dtype == E4M3:  # already cast for a static-scale FP8 qkv by a fused LayerNorm kernel (inference)
                qkv = self.qkv.forward_float8(x, compute_dtype(x.device, self.qkv.weight.dtype))  # (N, T, 3D)
            else:
                qkv = self.qkv(x)  # (N, T, 3D)
            q, k, v = qkv.view(n, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)  # (N, H, T, Dh)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class CrossAttention(nn.Module):
    """Multi-head attention from ``x`` (queries) to a context sequence (keys/values), with a padding mask."""

    def __init__(self, dim: int, context_dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        assert dim % num_heads == 0, f"hidden size {dim} is not divisible by num_heads {num_heads}"
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(context_dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (N, T, D); context: (N, L, C); mask: (N, L) bool, True = real token -> (N, T, D)."""
        n, t, d = x.shape
        q = self.q(x).view(n, t, self.num_heads, self.head_dim).transpose(1, 2)  # (N, H, T, Dh)
        kv = self.kv(context).view(n, context.shape[1], 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        attn_mask = None
        if mask is not None:
            # Every row needs at least one visible key, or softmax is NaN: an all-padding row (never produced by our
            # tokenizers, which always keep the [CLS]/BOS token) attends to everything instead.
            mask = mask.bool() | ~mask.bool().any(dim=1, keepdim=True)
            attn_mask = mask[:, None, None, :]  # (N, 1, 1, L)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=attn_mask)  # (N, H, T, Dh)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


@torch.library.custom_op("dit::linear_gelu_tanh", mutates_args=())
def linear_gelu_tanh(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``GELU_tanh(x @ weight^T + bias)``; on CUDA one cuBLASLt GEMM with the bias and GELU in its epilogue.

    x: (M, K), weight: (N, K), bias: (N,) -> (M, N). An opaque op (``torch.library.custom_op``) so that
    ``torch.compile`` keeps the fused GEMM instead of decomposing it into a GEMM and a separate GELU kernel, which
    writes and re-reads the 4x-wide activation. Inference only (no backward: training keeps the pre-activation).
    """
    if x.is_cuda:
        # cuBLASLt's GELU epilogue is the tanh approximation (as is aten's own fallback for this op on CUDA)
        return torch._addmm_activation(bias, x, weight.t(), use_gelu=True)
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")  # the CPU kernel of _addmm_activation is erf-GELU


@linear_gelu_tanh.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0])


@register_flop_formula(torch.ops.dit.linear_gelu_tanh)
def _linear_gelu_tanh_flops(x_shape, w_shape, *args, **kwargs) -> int:
    return 2 * x_shape[0] * x_shape[1] * w_shape[0]  # the GEMM's (M, K) x (K, N); the GELU is not counted


def compute_dtype(device: torch.device, default: torch.dtype) -> torch.dtype:
    """The dtype a layer computes in: the autocast dtype where autocast is on for ``device``, else ``default``."""
    dev = device.type
    if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):  # (meta tensors: FLOP counting)
        return torch.get_autocast_dtype(dev)
    return default


class Mlp(nn.Module):
    """Transformer MLP ``fc2(GELU_tanh(fc1(x)))`` (the DiT configuration of timm's ``Mlp``).

    Without autograd (sampling) ``fc1`` and the GELU are one op (``linear_gelu_tanh``; on CUDA one GEMM): 6.6%
    faster DiT-XL/2 forward passes at batch 512, same error against fp32 (docs/benchmarks.md). Setting
    ``fused_inference = False`` restores the two-kernel path (the benchmark's ablation).

    With ``gemm_epilogues = True`` training runs through ``dit.models.cublaslt.fused_mlp``: the GELU in fc1's GEMM
    (which also keeps the pre-activation) and its derivative in fc2's input-gradient GEMM, in the compute dtype
    (the trainer's ``model.mlp_epilogues``; on CUDA in bf16/fp16 only), on the GEMMs of ``gemm_backend``
    (``DiT.set_gemm_backend``: cuBLASLt's epilogues, or QuACK's).
    """

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.fused_inference = True
        self.gemm_epilogues = False
        self.gemm_backend = "cublas"

    def _epilogue_path(self, x: torch.Tensor) -> tuple[bool, torch.dtype]:
        """(whether training runs through ``fused_mlp``, the compute dtype)."""
        plain = type(self.fc1) is nn.Linear and type(self.fc2) is nn.Linear
        dtype = compute_dtype(x.device, self.fc1.weight.dtype)  # autocast does not reach the custom ops
        # on CUDA only in the dtypes cuBLASLt's epilogues take (fp32 training keeps the plain path)
        epilogue_dtype = dtype in (torch.bfloat16, torch.float16) or not x.is_cuda
        return self.gemm_epilogues and torch.is_grad_enabled() and plain and epilogue_dtype, dtype

    def _fused(self, x: torch.Tensor, dtype: torch.dtype, with_b2: bool) -> torch.Tensor:
        y = fused_mlp(x.reshape(-1, x.shape[-1]).to(dtype), self.fc1.weight, self.fc1.bias, self.fc2.weight,
                      self.fc2.bias if with_b2 else None, compute_weight(self.fc1, dtype),
                      compute_weight(self.fc2, dtype), self.gemm_backend)  # (M, D)
        return y.view(*x.shape[:-1], y.shape[-1])  # (..., D)

    def forward_split_bias(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``forward`` with fc2's bias left for the caller to add (as ``Attention.forward_split_bias``): x (..., D)
        -> (y (..., D), bias (D,) or None where it is already in y)."""
        fused, dtype = self._epilogue_path(x)
        if fused and x.dtype != E4M3 and self.fc2.bias is not None:
            return self._fused(x, dtype, with_b2=False), self.fc2.bias
        return self(x), None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., D) -> (..., D); an E4M3 ``x`` is already cast for a static-scale FP8 fc1 (DiT fused inference)."""
        if x.dtype == E4M3:
            dtype = compute_dtype(x.device, self.fc1.weight.dtype)
            h = self.fc1.forward_float8(x, dtype)  # (..., 4D)
            if getattr(self.fc2, "input_scale", None) is None:  # fc2 not in FP8 (or not calibrated)
                return self.fc2(self.act(h))
            # the GELU and fc2's input cast in one kernel: the 4x-wide activation is read once, written in 1 byte
            return self.fc2.forward_float8(gelu_tanh_fp8(h, self.fc2.input_scale), dtype)  # (..., D)
        # (an FP8 fc1, dit.models.fp8.Float8Linear, keeps its own GEMM)
        fused, dtype = self._epilogue_path(x)
        if fused:
            return self._fused(x, dtype, with_b2=True)
        if self.fused_inference and not torch.is_grad_enabled() and type(self.fc1) is nn.Linear:
            # autocast does not reach a custom op: cast as it would have cast fc1's inputs
            h = linear_gelu_tanh(x.reshape(-1, x.shape[-1]).to(dtype), self.fc1.weight.to(dtype),
                                 self.fc1.bias.to(dtype))  # (M, 4D)
            return self.fc2(h.view(*x.shape[:-1], h.shape[-1]))  # (..., D)
        return self.fc2(self.act(self.fc1(x)))


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over real tokens only, so padding never leaks into a pooled vector.

    tokens: (N, L, D); mask: (N, L) bool, True = real token (None = all real) -> (N, D).
    """
    if mask is None:
        return tokens.mean(dim=1)
    m = mask.to(tokens.dtype).unsqueeze(-1)  # (N, L, 1)
    return (tokens * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


def check_conditioning(
    owner: str,
    n: int,
    conditioning: str,
    context_dim: int | None,
    y: torch.Tensor | None,
    context: torch.Tensor | None,
    context_mask: torch.Tensor | None,
    pooled: torch.Tensor | None,
) -> None:
    """Shape checks of the conditioning inputs every model takes; raises ValueError naming ``owner`` and the shape.

    Conditioning a model does not use (``y`` for a text model, ``context`` for a class model) is not checked.
    """
    if conditioning == "class":
        if y is None:
            raise ValueError(f"{owner}: class-conditional model needs y (N,) labels (index num_classes = null class)")
        if y.shape != (n,):
            raise ValueError(f"{owner}: y must be (N,) = ({n},), got shape {tuple(y.shape)}")
    elif conditioning == "text":
        d = context_dim
        if context is None:
            raise ValueError(f"{owner}: text model needs context (N, L, {d}) token embeddings")
        if context.ndim != 3 or context.shape[0] != n or context.shape[2] != d:
            raise ValueError(f"{owner}: context must be (N, L, {d}) with N={n}, got shape {tuple(context.shape)}")
        if context_mask is not None and context_mask.shape != context.shape[:2]:
            raise ValueError(
                f"{owner}: context_mask must be (N, L) = {tuple(context.shape[:2])}, got {tuple(context_mask.shape)}"
            )
        if pooled is not None and pooled.shape != (n, d):
            raise ValueError(f"{owner}: pooled must be (N, {d}), got shape {tuple(pooled.shape)}")


def group_norm_stats(x: torch.Tensor, groups: int, eps: float
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """GroupNorm's statistics from per-(sample, channel) sums: x (N, C, *spatial) -> (x in the accumulation dtype,
    then (N, C) each: k (each channel's first value, the shift of its sums), its group's mean and 1 / std).

    fp32 statistics for bf16/fp16 x (as ``F.group_norm``), float64 kept. The sums over the spatial dims are taken
    about k and combined per group with the parallel-variance formula (Chan et al. 1979), so a mean far above the
    spread does not cancel the variance.
    """
    n, c = x.shape[:2]
    dims = tuple(range(2, x.ndim))
    count = math.prod(x.shape[2:])  # values per channel
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    k = xf[(slice(None), slice(None)) + (0,) * len(dims)].detach()  # (N, C): a value of each channel, as the shift
    d = xf - k.view(n, c, *(1,) * len(dims))
    s1 = d.sum(dims)  # (N, C)
    s2 = (d * d).sum(dims)  # (N, C)
    mean_c = (k + s1 / count).view(n, groups, c // groups)  # (N, G, C/G)
    m2_c = (s2 - s1 * s1 / count).view(n, groups, c // groups)  # per-channel sum of squared deviations
    mean_g = mean_c.mean(-1, keepdim=True)  # (N, G, 1)
    m2_g = m2_c.sum(-1, keepdim=True) + count * (mean_c - mean_g).square().sum(-1, keepdim=True)
    rstd = torch.rsqrt(m2_g.clamp_min(0) / (count * (c // groups)) + eps)  # (N, G, 1)
    mu = mean_g.expand(n, groups, c // groups).reshape(n, c)  # (N, C)
    return xf, k, mu, rstd.expand(n, groups, c // groups).reshape(n, c)


def group_norm_moments(
    x: torch.Tensor,
    norm: nn.GroupNorm,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    silu: bool = False,
) -> torch.Tensor:
    """``norm(x)``, then optionally AdaGN ``* (1 + scale) + shift`` (ADM Sec. 3) and SiLU, for x of any memory format.

    x: (N, C, *spatial); scale, shift: (N, C) or None -> same shape, format and dtype as x.

    The result equals ``F.group_norm`` (fp32 statistics, rounding aside), but it is built from per-(sample, channel)
    sums over the spatial dims, combined per group on (N, C) tensors, and one per-(sample, channel) affine map. The
    usual formulation views x as (N, G, -1), which for a channels-last x is not a view: under ``torch.compile`` that
    copies every normalised activation to NCHW and back (Inductor's GroupNorm kernels took 6.8 of UNet-B's 37.8 ms
    channels-last training step on an H100, docs/benchmarks.md run 13). Here every pass reads x in its own layout:
    the statistics are reductions over the spatial dims (contiguous along C in NHWC), the normalisation is
    elementwise. The channel sums are taken about each channel's first value and combined per group with the
    parallel-variance formula (Chan et al. 1979), so a large mean does not cancel the variance.
    """
    n, c = x.shape[:2]
    dims = tuple(range(2, x.ndim))
    xf, _, mu, a = group_norm_stats(x, norm.num_groups, norm.eps)  # a: rstd, (N, C)
    acc = xf.dtype
    b = torch.zeros_like(a)
    if norm.affine:
        a = a * norm.weight.to(acc)
        b = b + norm.bias.to(acc)
    if scale is not None:
        a = a * (1 + scale.to(acc))
        b = b * (1 + scale.to(acc))
    if shift is not None:
        b = b + shift.to(acc)
    view = (n, c, *(1,) * len(dims))
    y = (xf - mu.view(view)) * a.view(view) + b.view(view)  # same layout as x
    if silu:
        y = F.silu(y)
    return y.to(x.dtype)
