"""Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers", arXiv:2212.09748).

The class-conditional model is the paper's adaLN-Zero DiT with the exact module and parameter names of
facebookresearch/DiT, so the official checkpoints (``DiT-XL-2-256x256.pt``, ``DiT-XL-2-512x512.pt``) load with strict
keys. The text variant (``context_dim`` set) follows PixArt-alpha (Chen et al. 2023, Sec. 2.3): a cross-attention
layer after self-attention in every block, attending to projected text tokens with their padding mask, and a pooled
text vector added to the timestep embedding that drives adaLN-Zero.

Data flow (paper Fig. 3)::

    x (N, C, H, W) --patchify--> (N, T, D) + pos_embed --[DiTBlock x depth]--> final_layer --> (N, T, p*p*C_out)
    --unpatchify--> (N, C_out, H, W);   c = t_embedder(t) + y_embedder(y)  [or + pooled_embedder(pooled)]
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from . import quack_gemm
from .fp8 import E4M3
from .kernels import add_layernorm_modulate, layernorm_modulate
from .layers import (
    Attention,
    CrossAttention,
    LabelEmbedder,
    Mlp,
    TimestepEmbedder,
    check_conditioning,
    compile_regions,
    compute_dtype,
    get_2d_sincos_pos_embed,
    masked_mean,
    master_linear,
    modulate,
)
from .registry import register_model

__all__ = ["DiT", "DiTBlock", "FinalLayer", "PatchEmbed", "DIT_CONFIGS"]

# The paper's model sizes (Table 1): name -> (hidden_size, depth, num_heads). Every size has head width 64 but XL (72).
DIT_CONFIGS: dict[str, tuple[int, int, int]] = {
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}
DIT_PATCH_SIZES: tuple[int, ...] = (2, 4, 8)


class PatchEmbed(nn.Module):
    """Non-overlapping ``p x p`` patches -> tokens with one strided conv (timm's ``PatchEmbed`` without a norm).

    (N, C, H, W) -> (N, (H/p) * (W/p), D), tokens in row-major order.
    """

    def __init__(self, *, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A channels-last input makes the conv write (N, h, w, D) in memory, so the tokens below are a dense
        # (N, T, D) view: no transposing copy of the stream in either pass (an NCHW conv output cost three copies of
        # the whole stream per DiT-XL/2 training step, 0.4 ms; docs/benchmarks.md, run 28).
        x = x.contiguous(memory_format=torch.channels_last)
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, D, h, w) -> (N, h*w, D)


class DiTBlock(nn.Module):
    """DiT block with adaLN-Zero conditioning (paper Sec. 3.2, Fig. 3 right), optionally with cross-attention.

    ``x = x + gate_msa * Attn(modulate(LN(x), shift_msa, scale_msa))``
    ``x = x + CrossAttn(LN_ca(x), context, mask)``                 (text variant only, PixArt-alpha)
    ``x = x + gate_mlp * MLP(modulate(LN(x), shift_mlp, scale_mlp))``
    """

    def __init__(
        self,
        *,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        cross_attention: bool = False,
        mlp_norm_eps: float = 1e-6,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True)
        if cross_attention:
            self.norm_ca = nn.LayerNorm(hidden_size, eps=1e-6)
            # Keys/values come from tokens already projected to hidden_size by DiT.context_embedder.
            self.cross_attn = CrossAttention(hidden_size, hidden_size, num_heads, qkv_bias=True)
        else:
            self.norm_ca = None
            self.cross_attn = None
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=mlp_norm_eps)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (N, T, D); c: (N, D); context: (N, L, D) projected tokens; context_mask: (N, L) bool -> (N, T, D)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))  # (N, T, D)
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm_ca(x), context, context_mask)  # (N, T, D)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))  # (N, T, D)
        return x

    def forward_fused(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None,
        dtype: torch.dtype,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """``forward`` with each residual update fused into the LayerNorm kernel that follows it
        (``dit.models.kernels``); the block's last update is left pending for the next block's first LayerNorm.
        The attention's and the MLP's output biases go into those updates too (``forward_split_bias``), so their
        gradients come from the LayerNorm kernels' backward pass.

        x: (N, T, D) stream before ``pending`` = (o (N, T, D), gate (N, D), bias (D,) or None) is added as
        ``x + gate * (o + bias)`` (None: nothing pending); c: (N, D); dtype: the GEMMs' input dtype (the autocast
        dtype); context, context_mask: as ``forward`` -> (x, pending of this block).
        """
        mod = _modulation(self.adaLN_modulation, c, dtype)  # (N, 6D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        rows = x.shape[0] * x.shape[1]
        scale, out = _gemm_input(self.attn.qkv, rows, dtype)
        if pending is None:
            a = layernorm_modulate(x, shift_msa, scale_msa, self.norm1.eps, scale, out)  # (N, T, D)
        else:
            o, gate, bias = pending
            x, a = add_layernorm_modulate(x, o, gate, shift_msa, scale_msa, self.norm1.eps, scale, out, bias)
        o, bias = self.attn.forward_split_bias(a)  # (N, T, D), (D,) or None
        if self.cross_attn is not None:
            # norm_ca's affine LayerNorm is the modulation with shift = bias, scale = weight - 1, shared by all images
            n, d = c.shape
            w, b = self.norm_ca.weight.expand(n, d), self.norm_ca.bias.expand(n, d)
            x, a = add_layernorm_modulate(x, o, gate_msa, b, w - 1, self.norm_ca.eps, None, dtype, bias)
            o, bias = self.cross_attn(a, context, context_mask), None  # (N, T, D)
            gate_msa = torch.ones_like(b)  # the cross-attention output is added ungated
        scale, out = _gemm_input(self.mlp.fc1, rows, dtype)
        x, a = add_layernorm_modulate(x, o, gate_msa, shift_mlp, scale_mlp, self.norm2.eps, scale, out, bias)
        o, bias = self.mlp.forward_split_bias(a)  # (N, T, D), (D,) or None
        return x, (o, gate_mlp, bias)


def _modulation(ada_ln: nn.Sequential, c: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """adaLN's ``Linear(SiLU(c))`` on the fused path: c (N, D) -> (N, k * D); in training through ``master_linear``,
    which writes the gradients in the parameters' fp32 directly."""
    if torch.is_grad_enabled() and type(ada_ln[1]) is nn.Linear:
        return master_linear(ada_ln[0](c), ada_ln[1], dtype)
    return ada_ln(c)


def _gemm_input(layer: nn.Module, rows: int, dtype: torch.dtype) -> tuple[float | None, torch.dtype]:
    """(scale, dtype) of the input a fused kernel should write for ``layer``: E4M3 with its static scale for a
    calibrated ``Float8Linear`` whose shapes the FP8 GEMM takes (multiples of 16), else ``dtype`` unscaled."""
    scale = getattr(layer, "input_scale", None)
    if scale is None or rows % 16 or layer.in_features % 16 or layer.out_features % 16:
        return None, dtype
    return scale, E4M3


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm, then a linear map to ``p * p * out_channels`` values per token.

    (N, T, D), c: (N, D) -> (N, T, p * p * out_channels).
    """

    def __init__(self, *, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # (N, D) each
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (N, T, p*p*C_out)

    def forward_fused(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
        dtype: torch.dtype,
    ) -> torch.Tensor:
        """``forward(x + gate * (o + bias), c)`` with the last block's pending update ``(o, gate, bias)`` in the
        LayerNorm kernel (``DiTBlock.forward_fused``), whose backward also gives that bias's gradient.

        x: (N, T, D); c: (N, D); dtype: the GEMMs' input dtype -> (N, T, p*p*C_out) in ``dtype``.
        """
        shift, scale = _modulation(self.adaLN_modulation, c, dtype).chunk(2, dim=1)  # (N, D) each
        o, gate, bias = pending
        _, a = add_layernorm_modulate(x, o, gate, shift, scale, self.norm_final.eps, None, dtype, bias)  # (N, T, D)
        if torch.is_grad_enabled() and type(self.linear) is nn.Linear:
            return master_linear(a, self.linear, dtype)  # (N, T, p*p*C_out)
        return self.linear(a)


class DiT(nn.Module):
    """Diffusion Transformer with adaLN-Zero blocks; class-conditional, unconditional or text-conditional.

    ``num_classes > 0`` (and no ``context_dim``): class-conditional with label dropout ``class_dropout_prob`` in
    training (null class index ``num_classes``). ``num_classes = 0``: unconditional. ``context_dim`` set: text model
    (``num_classes`` must be 0). ``learn_sigma`` doubles the output channels (eps, then the variance interpolation
    values of Nichol & Dhariwal 2021). ``timestep_freq_shift=1`` reproduces diffusers' DiT timestep features and
    ``mlp_norm_eps=1e-5`` its pre-MLP LayerNorm, for exact parity with ``DiTTransformer2DModel`` weights.
    """

    def __init__(
        self,
        *,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        context_dim: int | None = None,
        timestep_freq_shift: float = 0.0,
        mlp_norm_eps: float = 1e-6,
    ):
        super().__init__()
        if input_size <= 0 or patch_size <= 0 or input_size % patch_size:
            raise ValueError(f"DiT: input_size={input_size} must be a positive multiple of patch_size={patch_size}")
        if in_channels <= 0 or depth <= 0:
            raise ValueError(f"DiT: in_channels and depth must be positive, got {in_channels}, {depth}")
        if hidden_size <= 0 or num_heads <= 0 or hidden_size % num_heads:
            raise ValueError(f"DiT: hidden_size={hidden_size} must be a positive multiple of num_heads={num_heads}")
        if hidden_size % 4:
            raise ValueError(f"DiT: hidden_size={hidden_size} must be divisible by 4 (2-D sin-cos position embedding)")
        if num_classes < 0:
            raise ValueError(f"DiT: num_classes must be >= 0, got {num_classes}")
        if context_dim is not None and context_dim <= 0:
            raise ValueError(f"DiT: context_dim must be positive or None, got {context_dim}")
        if context_dim is not None and num_classes:
            raise ValueError(f"DiT: text models (context_dim={context_dim}) take num_classes=0, got {num_classes}")
        if not 0.0 <= class_dropout_prob < 1.0:
            raise ValueError(f"DiT: class_dropout_prob must be in [0, 1), got {class_dropout_prob}")

        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma
        self.context_dim = context_dim
        self.conditioning = "text" if context_dim is not None else ("class" if num_classes > 0 else "none")
        self.grad_checkpointing = False
        self.low_precision_residual = False
        # Without autograd, models whose blocks run FP8 GEMMs with static scales
        # (dit.models.fp8.calibrate_float8) use DiTBlock.forward_fused: residual updates, LayerNorm, modulation and
        # FP8 casts in one kernel (dit.models.kernels). False = the plain block forward (the benchmark's ablation).
        # bf16 models keep the plain forward: Inductor's kernels are as fast there (docs/benchmarks.md, run 7).
        self.fused_inference = True
        # With autograd: the same deferred-residual forward through the differentiable kernels (Triton forward and
        # backward on CUDA). Measured under torch.compile (DiT-XL/2 +5.3%, S/2 +6.7% trainer img/s,
        # docs/benchmarks.md, run 8), where the trainer turns it on (model.fused_training).
        self.fused_training = False

        self.x_embedder = PatchEmbed(img_size=input_size, patch_size=patch_size, in_chans=in_channels,
                                     embed_dim=hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size, downscale_freq_shift=timestep_freq_shift)
        self.y_embedder = (
            LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if self.conditioning == "class" else None
        )
        if context_dim is not None:
            # PixArt-alpha's caption projection: Linear -> GELU(tanh) -> Linear.
            self.context_embedder = nn.Sequential(
                nn.Linear(context_dim, hidden_size), nn.GELU(approximate="tanh"), nn.Linear(hidden_size, hidden_size)
            )
            self.pooled_embedder = nn.Linear(context_dim, hidden_size)
        else:
            self.context_embedder = None
            self.pooled_embedder = None
        # Fixed (not learned) sin-cos position embedding; a Parameter, not a buffer, so the official key set matches.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size=hidden_size, num_heads=num_heads, mlp_ratio=mlp_ratio,
                     cross_attention=context_dim is not None, mlp_norm_eps=mlp_norm_eps)
            for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size=hidden_size, patch_size=patch_size, out_channels=self.out_channels)
        self.initialize_weights()
        # loaded weights reach the compute-dtype copies of set_compute_weights (a no-op without copies)
        self.register_load_state_dict_post_hook(_refresh_after_load)

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """The official initialisation: xavier-uniform Linear weights, zero biases, adaLN-Zero (paper Sec. 3.2).

        All adaLN modulations and the final linear layer are zero, so a fresh model outputs exactly zero.
        """

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        pos = get_2d_sincos_pos_embed(self.hidden_size, self.input_size // self.patch_size)  # (T, D) float64
        self.pos_embed.copy_(pos.float().unsqueeze(0))
        # The patch conv is initialised like a Linear layer over the flattened (C * p * p) patch.
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
            if block.cross_attn is not None:
                # PixArt-alpha zero-inits the cross-attention output so every block starts as a plain DiT block.
                nn.init.zeros_(block.cross_attn.proj.weight)
                nn.init.zeros_(block.cross_attn.proj.bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass (less memory, ~1/3 more compute)."""
        self.grad_checkpointing = enable

    def compile_blocks(self, **compile_kw) -> int:
        """Regional compilation (``layers.compile_regions``): every block's ``forward`` and ``forward_fused`` run one
        compiled function shared by all blocks, so compilation costs one block's time instead of the network's; the
        embedders and the final layer stay eager. ``compile_kw`` go to ``torch.compile``. Returns the block count."""
        return compile_regions(self.blocks, ("forward", "forward_fused"), **compile_kw)

    def set_low_precision_residual(self, enable: bool = True) -> None:
        """Keep the residual stream (N, T, D) in the compute dtype of the patch embedding (bf16 under autocast).

        By default the stream is fp32 under autocast (the fp32 position embedding promotes it), as in the official
        code. In a compiled step about 45% of DiT-S/2's GPU time is memory-bound normalisation and elementwise kernels
        that read and write this stream; a bf16 stream halves that traffic (Megatron-LM's default,
        ``fp32_residual_connection=False``). LayerNorm statistics are still computed in fp32. Without autocast (an
        fp32 model) this changes nothing. Under fp16 autocast the stream is fp16, whose 3 more mantissa bits than
        bf16 keep DiT-XL/2's output closer to fp32 than bf16 autocast with the fp32 stream (docs/benchmarks.md).
        """
        self.low_precision_residual = enable

    def set_mlp_epilogues(self, enable: bool = True) -> None:
        """Train every block's MLP with the GELU in cuBLASLt GEMM epilogues (``Mlp.gemm_epilogues``,
        ``dit.models.cublaslt``): fc1's GEMM applies the GELU and keeps the pre-activation, fc2's input-gradient GEMM
        applies the GELU's derivative. Same formulas; the GELU is computed from the fp32 accumulator instead of the
        rounded pre-activation. Only with autograd; sampling keeps ``fused_inference``.
        """
        for block in self.blocks:
            block.mlp.gemm_epilogues = enable

    def set_gemm_backend(self, name: str) -> None:
        """Run the blocks' training GEMMs on ``name``'s kernels (``dit.models.quack_gemm.BACKENDS``): "cublas"
        (torch's GEMMs and cuBLASLt's GELU epilogues) or "quack" (QuACK's Hopper kernels for the qkv, proj, fc1 and
        fc2 forward and input-gradient GEMMs, GELU epilogues included; the weight gradients stay cuBLAS's). Used
        on the paths of ``set_fused_attention`` and ``set_mlp_epilogues``; "quack" needs an sm90+ GPU and the
        quack-kernels package (a one-line ValueError otherwise). Same formulas, fp32 accumulation."""
        quack_gemm.check_backend(name)
        for block in self.blocks:
            block.attn.gemm_backend = name
            block.mlp.gemm_backend = name

    def set_fused_qkv_backward(self, enable: bool = True) -> None:
        """In training, build each block's qkv gradient and qkv bias gradient from the attention's dq, dk, dv in one
        Triton pass (``Attention.fused_qkv_backward``, ``dit.models.kernels.qkv_grad``) instead of autograd's copy
        plus a second read for the bias gradient. Same values (a copy and an fp32 column sum)."""
        for block in self.blocks:
            block.attn.fused_qkv_backward = enable

    def set_fused_attention(self, enable: bool = True) -> None:
        """In training, run each block's qkv projection and self-attention through
        ``dit.models.attention_kernels.qkv_attention`` (``Attention.fused_attention``): cuDNN's forward, and a
        FlashAttention-2 backward in Triton that reads q, k, v from the packed qkv GEMM output and writes their
        gradients straight into the GEMM's output gradient (no dq/dk/dv copies, no separate rowsum(dO * O), dQ
        conversion or bias-gradient pass). Heads of 16, 32, 64 or 72 (others keep the plain path); where both are on,
        it replaces ``set_fused_qkv_backward``'s path. Same formulas, fp32 accumulation."""
        for block in self.blocks:
            block.attn.fused_attention = enable

    def compute_weight_layers(self) -> list[nn.Linear]:
        """The linear layers whose weights ``set_compute_weights`` can keep in the compute dtype: every block's qkv,
        proj, fc1, fc2 and adaLN modulation (nn.Linear only: an FP8 layer keeps its own casts)."""
        layers = []
        for block in self.blocks:
            for lin in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2, block.adaLN_modulation[1]):
                if type(lin) is nn.Linear:
                    layers.append(lin)
        return layers

    def set_compute_weights(self, dtype: torch.dtype | None) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """Keep every ``compute_weight_layers`` weight also in ``dtype`` (bf16/fp16, the autocast dtype; None: no
        copies) as a non-persistent buffer ``weight_c``, which the training path's GEMMs read instead of casting the
        fp32 weight on every step (``layers.compute_weight``: the fused attention, the MLP's epilogue GEMMs, proj
        and adaLN under ``fused_training``). Checkpoints do not see the copies.

        The copies must follow the weights: the optimizer writes them with each update
        (``dit.optim.AdamWEMA.keep_compute_copies``; the trainer's ``model.compute_weights``), ``load_state_dict``
        refreshes them, and any other change of the weights needs ``refresh_compute_weights()``. Returns the
        (weight, copy) pairs.
        """
        pairs = []
        for lin in self.compute_weight_layers():
            if dtype is None:
                if "weight_c" in lin._buffers:
                    del lin._buffers["weight_c"]
                continue
            lin.register_buffer("weight_c", lin.weight.detach().to(dtype), persistent=False)
            pairs.append((lin.weight, lin.weight_c))
        return pairs

    @torch.no_grad()
    def refresh_compute_weights(self) -> None:
        """Copy the weights into their ``set_compute_weights`` copies again (after a change the optimizer did not
        make; ``load_state_dict`` calls it)."""
        for lin in self.compute_weight_layers():
            if lin._buffers.get("weight_c") is not None:
                lin.weight_c.copy_(lin.weight)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p * p * C_out) -> (N, C_out, H, W), inverse of the row-major patchify."""
        c, p = self.out_channels, self.patch_size
        h = w = self.input_size // p
        x = x.reshape(x.shape[0], h, w, p, p, c)  # (N, h, w, p, p, C)
        x = torch.einsum("nhwpqc->nchpwq", x)  # (N, C, h, p, w, p)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def _check_inputs(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None,
        context: torch.Tensor | None,
        context_mask: torch.Tensor | None,
        pooled: torch.Tensor | None,
    ) -> None:
        s, c = self.input_size, self.in_channels
        if x.ndim != 4 or x.shape[1] != c:
            raise ValueError(f"DiT: x must be (N, {c}, {s}, {s}), got shape {tuple(x.shape)}")
        if x.shape[2] != s or x.shape[3] != s:
            raise ValueError(
                f"DiT: spatial size {x.shape[2]}x{x.shape[3]} does not match input_size={s} (the position "
                f"embedding is built for {s}x{s} latents; create the model with input_size={x.shape[2]})"
            )
        n = x.shape[0]
        if t.shape != (n,):
            raise ValueError(f"DiT: t must be (N,) = ({n},), got shape {tuple(t.shape)}")
        check_conditioning("DiT", n, self.conditioning, self.context_dim, y, context, context_mask, pooled)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (N, C, H, W); t: (N,); y: (N,) int64; context: (N, L, context_dim); context_mask: (N, L) bool
        (True = real token); pooled: (N, context_dim) -> (N, out_channels, H, W).

        Conditioning a model does not use (y for a text model, context for a class model) is ignored.
        """
        self._check_inputs(x, t, y, context, context_mask, pooled)
        h = self.x_embedder(x)  # (N, T, D), bf16 under autocast
        # fp32 position embedding -> fp32 stream (official); cast first -> the stream stays in the compute dtype
        h = h + (self.pos_embed.to(h.dtype) if self.low_precision_residual else self.pos_embed)  # (N, T, D)
        c = self.t_embedder(t)  # (N, D)
        if self.y_embedder is not None:
            c = c + self.y_embedder(y, self.training)  # (N, D)
        ctx = mask = None
        if self.context_embedder is not None:
            if context_mask is not None:
                mask = context_mask.bool()
            if pooled is None:  # masked mean of the raw tokens, so padding never leaks into the adaLN input
                pooled = masked_mean(context, mask)  # (N, C_ctx)
            ctx = self.context_embedder(context.to(c.dtype))  # (N, L, D)
            c = c + self.pooled_embedder(pooled.to(c.dtype))  # (N, D)
        use_ckpt = self.grad_checkpointing and torch.is_grad_enabled()
        if torch.is_grad_enabled():
            fused = self.fused_training and not use_ckpt
        else:
            fused = self.fused_inference and getattr(self.blocks[0].attn.qkv, "input_scale", None) is not None
        if fused:
            pending = None
            dtype = compute_dtype(h.device, h.dtype)
            for block in self.blocks:
                h, pending = block.forward_fused(h, c, pending, dtype, ctx, mask)  # (N, T, D), (o, gate, bias)
            return self.unpatchify(self.final_layer.forward_fused(h, c, pending, dtype))  # (N, C_out, H, W)
        for block in self.blocks:
            if use_ckpt:
                h = checkpoint(block, h, c, ctx, mask, use_reentrant=False)  # (N, T, D)
            else:
                h = block(h, c, ctx, mask)  # (N, T, D)
        h = self.final_layer(h, c)  # (N, T, p*p*C_out)
        return self.unpatchify(h)  # (N, C_out, H, W)


def _refresh_after_load(module: DiT, incompatible_keys) -> None:
    """``load_state_dict`` post-hook (a module-level function, so that a DiT stays picklable)."""
    module.refresh_compute_weights()


def _register() -> None:
    for size, (hidden, depth, heads) in DIT_CONFIGS.items():
        for p in DIT_PATCH_SIZES:
            arch = dict(hidden_size=hidden, depth=depth, num_heads=heads, patch_size=p)
            register_model(f"DiT-{size}/{p}", cls=DiT, **arch)
            # Text variant: MiniLM-L6 token width (384), no class labels.
            register_model(f"DiT-{size}/{p}-T", cls=DiT, **arch, context_dim=384, num_classes=0)


_register()
