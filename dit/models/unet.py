"""ADM-style UNet baseline (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs", Sec. 3 and App. B).

The UNet plugs into the same diffusion core, trainer and sampler as the DiT: same attributes, same forward signature,
same timestep/class embedders (``layers.TimestepEmbedder`` with 256 frequencies, ``layers.LabelEmbedder`` with a null
class for classifier-free guidance) and the same "exactly zero at init" property.

Architecture (ADM):

* residual blocks ``GroupNorm -> SiLU -> conv3x3 -> AdaGN(emb) -> SiLU -> dropout -> conv3x3 (zero-init)`` with a
  skip (identity, or 1x1 conv when the width changes). AdaGN (ADM Sec. 3, "adaptive group normalization") is
  ``GroupNorm(h) * (1 + scale) + shift`` with ``(scale, shift)`` a linear projection of the conditioning embedding;
* BigGAN-style up/down sampling: a residual block whose both paths resample (avg-pool / nearest) before the first conv;
* self-attention (fused qkv, ``F.scaled_dot_product_attention``) at the chosen downsample factors and in the middle,
  and, for text models, cross-attention to the text tokens (with their padding mask) right after it;
* skip connections by channel concatenation from every encoder block to the mirrored decoder block.

Registered sizes (``UNet-S/B/L/XL`` and text variants ``-T``) match the forward FLOPs of DiT-S/2 ... DiT-XL/2 on
32x32x4 latents (see ``docs/unet.md`` for the numbers).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .layers import (
    Attention,
    CrossAttention,
    LabelEmbedder,
    TimestepEmbedder,
    check_conditioning,
    compile_regions,
    group_norm_moments,
    masked_mean,
)
from .norm_kernels import group_norm_kernels
from .registry import register_model

__all__ = ["UNet", "ResBlock", "AttentionBlock", "CrossAttentionBlock"]


def _zero_(module: nn.Module) -> nn.Module:
    """Zero all parameters of ``module`` (the last layer of every residual branch; ADM's ``zero_module``)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def upsample_nearest2x(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour 2x upsampling, (N, C, H, W) -> (N, C, 2H, 2W), equal to ``F.interpolate(x, scale_factor=2)``
    and in the memory format of x. Written as a broadcast so that its gradient is a sum over each 2x2 window: under
    ``torch.compile``, ``F.interpolate``'s gradient is an atomic scatter into a zeroed buffer."""
    n, c, h, w = x.shape
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        y = x.permute(0, 2, 3, 1)[:, :, None, :, None, :].expand(n, h, 2, w, 2, c)  # (N, H, 2, W, 2, C)
        return y.reshape(n, 2 * h, 2 * w, c).permute(0, 3, 1, 2)  # (N, C, 2H, 2W), NHWC strides
    return x[:, :, :, None, :, None].expand(n, c, h, 2, w, 2).reshape(n, c, 2 * h, 2 * w)


def _group_norm(
    x: torch.Tensor,
    norm: nn.GroupNorm,
    moments: bool | str,
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    silu: bool = False,
) -> torch.Tensor:
    """``norm(x)`` [AdaGN ``* (1 + scale) + shift``, scale/shift (N, C, 1, 1)] [SiLU]; ``moments``: the same through
    ``layers.group_norm_moments`` (no NCHW copy of a channels-last x under torch.compile), or "kernels": through
    ``norm_kernels.group_norm_kernels`` (Triton kernels on CUDA for a channels-last x, its reference elsewhere)."""
    if moments:
        if scale is not None:
            scale, shift = scale.flatten(1), shift.flatten(1)  # (N, C, 1, 1) -> (N, C)
        if moments == "kernels":
            return group_norm_kernels(x, norm, scale, shift, silu=silu)
        return group_norm_moments(x, norm, scale, shift, silu=silu)
    h = norm(x)
    if scale is not None:
        h = torch.addcmul(shift, h, 1 + scale)
    return F.silu(h) if silu else h


def _check_groups(channels: int, groups: int) -> None:
    if channels % groups:
        raise ValueError(f"UNet: width {channels} is not divisible by norm_groups={groups} (GroupNorm needs it)")


class ResBlock(nn.Module):
    """ADM residual block with AdaGN conditioning and optional BigGAN-style up/down sampling.

    x: (N, C_in, H, W), emb: (N, E) -> (N, C_out, H', W') with H' = 2H (up), H/2 (down) or H.
    """

    def __init__(
        self,
        *,
        channels: int,
        emb_channels: int,
        out_channels: int | None = None,
        dropout: float = 0.0,
        use_scale_shift_norm: bool = True,
        up: bool = False,
        down: bool = False,
        norm_groups: int = 32,
    ):
        super().__init__()
        if up and down:
            raise ValueError("ResBlock: up and down cannot both be set")
        out_channels = out_channels or channels
        _check_groups(channels, norm_groups)
        _check_groups(out_channels, norm_groups)
        self.up, self.down = up, down
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_norm = nn.GroupNorm(norm_groups, channels)
        self.in_conv = nn.Conv2d(channels, out_channels, 3, padding=1)
        # AdaGN needs a scale and a shift per channel; the plain variant adds one bias per channel.
        self.emb_proj = nn.Linear(emb_channels, out_channels * (2 if use_scale_shift_norm else 1))
        self.out_norm = nn.GroupNorm(norm_groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        # Zero-init so that every residual block starts as the identity (ADM, and DiT's adaLN-Zero idea).
        self.out_conv = _zero_(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        self.moment_norm = False  # UNet.set_moment_norm

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return upsample_nearest2x(x)
        if self.down:
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        return x

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x: (N, C_in, H, W); emb: (N, E) -> (N, C_out, H', W')."""
        h = _group_norm(x, self.in_norm, self.moment_norm, silu=True)  # (N, C_in, H, W)
        # BigGAN up/down: resample after the activation and before the conv, on both paths.
        h = self.in_conv(self._resample(h))  # (N, C_out, H', W')
        x = self._resample(x)  # (N, C_in, H', W')
        e = self.emb_proj(F.silu(emb)).to(h.dtype)[:, :, None, None]  # (N, 2*C_out or C_out, 1, 1)
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)  # (N, C_out, 1, 1) each
            h = _group_norm(h, self.out_norm, self.moment_norm, scale, shift, silu=True)  # AdaGN: GN(h)*(1+s)+b
        else:
            h = _group_norm(h + e, self.out_norm, self.moment_norm, silu=True)
        h = self.out_conv(self.dropout(h))  # (N, C_out, H', W')
        return self.skip(x) + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv (used when ``resblock_updown=False``). (N, C, H, W) -> (N, C, H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest 2x upsampling then a 3x3 conv (used when ``resblock_updown=False``). (N, C, H, W) -> (N, C, 2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(upsample_nearest2x(x))


def _to_tokens(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, H*W, C); a free view for channels-last tensors."""
    n, c, h, w = x.shape
    return x.permute(0, 2, 3, 1).reshape(n, h * w, c)


def _from_tokens(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(N, H*W, C) -> (N, C, H, W) (channels-last strides)."""
    return x.reshape(x.shape[0], h, w, x.shape[2]).permute(0, 3, 1, 2)


class AttentionBlock(nn.Module):
    """Pre-norm residual self-attention over all spatial positions. (N, C, H, W) -> (N, C, H, W)."""

    def __init__(self, *, channels: int, num_heads: int, norm_groups: int = 32):
        super().__init__()
        _check_groups(channels, norm_groups)
        self.norm = nn.GroupNorm(norm_groups, channels)
        self.attn = Attention(channels, num_heads)  # fused qkv + proj, scaled_dot_product_attention
        _zero_(self.attn.proj)  # the block starts as the identity
        self.moment_norm = False  # UNet.set_moment_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        out = self.attn(_to_tokens(_group_norm(x, self.norm, self.moment_norm)))  # (N, H*W, C)
        return x + _from_tokens(out, h, w)


class CrossAttentionBlock(nn.Module):
    """Pre-norm residual cross-attention from spatial positions to text tokens. (N, C, H, W) -> (N, C, H, W)."""

    def __init__(self, *, channels: int, context_dim: int, num_heads: int, norm_groups: int = 32):
        super().__init__()
        _check_groups(channels, norm_groups)
        self.norm = nn.GroupNorm(norm_groups, channels)
        self.attn = CrossAttention(channels, context_dim, num_heads)
        _zero_(self.attn.proj)
        self.moment_norm = False  # UNet.set_moment_norm

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x: (N, C, H, W); context: (N, L, context_dim); mask: (N, L) bool or None."""
        h, w = x.shape[-2:]
        out = self.attn(_to_tokens(_group_norm(x, self.norm, self.moment_norm)), context, mask)  # (N, H*W, C)
        return x + _from_tokens(out, h, w)


class CondSequential(nn.ModuleList):
    """A stage of the UNet: runs its layers in order, handing each the conditioning it takes."""

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None, mask: torch.Tensor | None
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, CrossAttentionBlock):
                x = layer(x, context, mask)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    """ADM UNet for (latent) diffusion with the DiT's interface (see ``docs/architecture.md``).

    ``attention_resolutions`` are downsample factors (ADM style): with ``input_size=32``, ``(2, 4, 8)`` puts
    self-attention at 16x16, 8x8 and 4x4. Heads are ``width // num_head_channels`` when ``num_head_channels`` is set,
    else ``num_heads``. ``context_dim`` makes a text model (cross-attention after each self-attention, pooled text
    added to the timestep embedding); use ``num_classes=0`` with it. The network is convolutional, so any spatial size
    divisible by ``2 ** (len(channel_mult) - 1)`` is accepted; ``input_size`` is the training size.

    forward: x (N, in_channels, H, W), t (N,) -> (N, out_channels, H, W).
    """

    def __init__(
        self,
        *,
        input_size: int = 32,
        in_channels: int = 4,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (2, 4),
        num_heads: int = 4,
        num_head_channels: int | None = 64,
        dropout: float = 0.0,
        num_classes: int = 1000,
        class_dropout_prob: float = 0.1,
        learn_sigma: bool = True,
        context_dim: int | None = None,
        use_scale_shift_norm: bool = True,
        resblock_updown: bool = True,
        norm_groups: int = 32,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        channel_mult = tuple(int(m) for m in channel_mult)
        attention_resolutions = tuple(int(a) for a in attention_resolutions)
        if not channel_mult or min(channel_mult) < 1:
            raise ValueError(f"UNet: channel_mult must be a non-empty tuple of positive ints, got {channel_mult}")
        if num_res_blocks < 1:
            raise ValueError(f"UNet: num_res_blocks must be >= 1, got {num_res_blocks}")
        if in_channels < 1 or model_channels < 1:
            raise ValueError(
                f"UNet: in_channels and model_channels must be positive, got {in_channels}, {model_channels}"
            )
        self.downsample_factor = 2 ** (len(channel_mult) - 1)
        if input_size % self.downsample_factor:
            raise ValueError(
                f"UNet: input_size={input_size} is not divisible by 2**(len(channel_mult)-1)={self.downsample_factor}"
            )
        factors = [2**i for i in range(len(channel_mult))]
        bad = [a for a in attention_resolutions if a not in factors]
        if bad:
            raise ValueError(
                f"UNet: attention_resolutions {bad} are not downsample factors of this UNet (valid: {factors})"
            )
        if num_classes < 0:
            raise ValueError(f"UNet: num_classes must be >= 0, got {num_classes}")
        if context_dim is not None and num_classes > 0:
            raise ValueError(f"UNet: text models (context_dim={context_dim}) take num_classes=0, got {num_classes}")
        if context_dim is not None and context_dim < 1:
            raise ValueError(f"UNet: context_dim must be positive or None, got {context_dim}")

        self.input_size = input_size
        self.in_channels = in_channels
        self.learn_sigma = learn_sigma
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.num_classes = num_classes
        self.context_dim = context_dim
        self.conditioning = "text" if context_dim is not None else ("class" if num_classes > 0 else "none")
        self.model_channels = model_channels
        self.channel_mult = channel_mult
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.grad_checkpointing = grad_checkpointing
        self.channels_last = False  # set_channels_last
        self.moment_norm = False  # set_moment_norm

        def heads(ch: int) -> int:
            if num_head_channels is None:
                if ch % num_heads:
                    raise ValueError(f"UNet: width {ch} is not divisible by num_heads={num_heads}")
                return num_heads
            if ch % num_head_channels:
                raise ValueError(
                    f"UNet: attention width {ch} is not divisible by num_head_channels={num_head_channels}"
                )
            return ch // num_head_channels

        def attn_layers(ch: int) -> list[nn.Module]:
            layers: list[nn.Module] = [AttentionBlock(channels=ch, num_heads=heads(ch), norm_groups=norm_groups)]
            if context_dim is not None:
                cross = CrossAttentionBlock(
                    channels=ch, context_dim=context_dim, num_heads=heads(ch), norm_groups=norm_groups
                )
                layers.append(cross)
            return layers

        def res(ch_in: int, ch_out: int, *, up: bool = False, down: bool = False) -> ResBlock:
            return ResBlock(
                channels=ch_in, emb_channels=emb_dim, out_channels=ch_out, dropout=dropout,
                use_scale_shift_norm=use_scale_shift_norm, up=up, down=down, norm_groups=norm_groups,
            )  # fmt: skip

        # Conditioning: the DiT's embedders, at ADM's embedding width 4 * model_channels.
        emb_dim = 4 * model_channels
        self.t_embedder = TimestepEmbedder(emb_dim, frequency_embedding_size=256)
        self.y_embedder = LabelEmbedder(num_classes, emb_dim, class_dropout_prob) if num_classes > 0 else None
        if context_dim is not None:
            # Pooled text -> the same space as the timestep embedding (as the class embedding for class models).
            self.pooled_embedder = nn.Linear(context_dim, emb_dim)
        else:
            self.pooled_embedder = None

        # Encoder.
        ch = model_channels * channel_mult[0]
        self.input_blocks = nn.ModuleList([CondSequential([nn.Conv2d(in_channels, ch, 3, padding=1)])])
        skip_channels = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                stage: list[nn.Module] = [res(ch, model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    stage += attn_layers(ch)
                self.input_blocks.append(CondSequential(stage))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                down = res(ch, ch, down=True) if resblock_updown else Downsample(ch)
                self.input_blocks.append(CondSequential([down]))
                skip_channels.append(ch)
                ds *= 2

        # Middle: res -> attention (-> cross-attention) -> res, at the lowest resolution.
        self.middle_block = CondSequential([res(ch, ch), *attn_layers(ch), res(ch, ch)])

        # Decoder: num_res_blocks + 1 blocks per level, each eating one encoder skip by concatenation.
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                skip_ch = skip_channels.pop()
                stage = [res(ch + skip_ch, model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    stage += attn_layers(ch)
                if level and i == num_res_blocks:
                    stage.append(res(ch, ch, up=True) if resblock_updown else Upsample(ch))
                    ds //= 2
                self.output_blocks.append(CondSequential(stage))
        assert not skip_channels, "every encoder skip is consumed once"

        _check_groups(ch, norm_groups)
        self.out_norm = nn.GroupNorm(norm_groups, ch)
        self.out_conv = _zero_(nn.Conv2d(ch, self.out_channels, 3, padding=1))  # a fresh UNet outputs exactly 0
        self._init_embedders()

    def _init_embedders(self) -> None:
        # Same initialisation as the DiT's embedders (normal(0.02)); convs keep PyTorch's default (as ADM).
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each stage's activations in the backward pass (saves memory, costs one more forward)."""
        self.grad_checkpointing = enable

    def set_channels_last(self, enable: bool = True) -> None:
        """Carry the activations in channels-last (NHWC) memory format. cuDNN's convolutions on Hopper compute in NHWC,
        so NCHW activations are transposed into and out of every convolution (7 ms of UNet-B's 41 ms training step at
        batch 64 on an H100, docs/benchmarks.md run 12). Only the input is converted: convolutions keep the format of
        their input, and the parameters keep theirs (checkpoints, the EMA and the one-pass AdamW kernel see the same
        tensors). Meant for compiled runs (Inductor's norm kernels follow the layout; eager GroupNorm may not)."""
        self.channels_last = enable

    def set_moment_norm(self, enable: bool = True, kernels: bool = False) -> None:
        """Compute every GroupNorm (with its AdaGN and SiLU) from per-channel moments (``layers.group_norm_moments``):
        the same function, without the (N, G, -1) view that copies a channels-last activation to NCHW and back under
        torch.compile. For channels-last compiled runs (docs/benchmarks.md run 13). ``kernels``: in the Triton
        kernels of ``norm_kernels.group_norm_act`` instead of Inductor's (run 14)."""
        mode = ("kernels" if kernels else True) if enable else False
        self.moment_norm = mode
        for m in self.modules():
            if isinstance(m, (ResBlock, AttentionBlock, CrossAttentionBlock)):
                m.moment_norm = mode

    def set_fused_attention(self, enable: bool = True) -> None:
        """In training, run every self-attention block's qkv projection and attention through
        ``attention_kernels.qkv_attention`` (cuDNN's forward, a Triton backward on the packed qkv output; as
        ``DiT.set_fused_attention``), at the head dims it takes (ADM's 64)."""
        for m in self.modules():
            if isinstance(m, AttentionBlock):
                m.attn.fused_attention = enable

    def compile_blocks(self, **compile_kw) -> int:
        """Regional compilation (``layers.compile_regions``): the residual, attention and resampling blocks each run
        the compiled function of their type (one graph per distinct input shape, shared by blocks of equal shape);
        the input and output convolutions and the embedders stay eager. ``compile_kw`` go to ``torch.compile``.
        Returns the number of compiled blocks."""
        kinds = (ResBlock, AttentionBlock, CrossAttentionBlock, Downsample, Upsample)
        return compile_regions((m for m in self.modules() if isinstance(m, kinds)), **compile_kw)

    def _check_inputs(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None,
        context: torch.Tensor | None,
        context_mask: torch.Tensor | None,
        pooled: torch.Tensor | None,
    ) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"UNet: x must be (N, {self.in_channels}, H, W), got shape {tuple(x.shape)}")
        n, _, h, w = x.shape
        f = self.downsample_factor
        if h % f or w % f:
            raise ValueError(f"UNet: spatial size {h}x{w} is not divisible by 2**(len(channel_mult)-1)={f}")
        if t.shape != (n,):
            raise ValueError(f"UNet: t must be (N,) = ({n},), got shape {tuple(t.shape)}")
        check_conditioning("UNet", n, self.conditioning, self.context_dim, y, context, context_mask, pooled)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (N, C, H, W); t: (N,); y: (N,) int64; context: (N, L, D_ctx); context_mask: (N, L) bool, True = real
        token; pooled: (N, D_ctx) -> (N, out_channels, H, W)."""
        self._check_inputs(x, t, y, context, context_mask, pooled)
        emb = self.t_embedder(t)  # (N, E)
        if self.y_embedder is not None:
            emb = emb + self.y_embedder(y, self.training)  # (N, E)
        if self.pooled_embedder is not None:
            if pooled is None:  # masked mean of the tokens: padding never leaks in
                pooled = masked_mean(context, context_mask)  # (N, D_ctx)
            emb = emb + self.pooled_embedder(pooled.to(emb.dtype))  # (N, E)
        dtype = self.out_conv.weight.dtype  # run in the parameters' dtype (a bf16 model takes fp32 inputs)
        if self.context_dim is None:
            context = None  # class / unconditional models ignore text
        elif context is not None:
            context = context.to(dtype)  # (N, L, D_ctx)
        mask = context_mask.bool() if (context is not None and context_mask is not None) else None

        def run(stage: CondSequential, h: torch.Tensor) -> torch.Tensor:
            if self.grad_checkpointing and torch.is_grad_enabled():
                return checkpoint(stage, h, emb, context, mask, use_reentrant=False)
            return stage(h, emb, context, mask)

        h = x.to(dtype)  # (N, C, H, W)
        if self.channels_last:
            h = h.contiguous(memory_format=torch.channels_last)  # (N, C, H, W), NHWC strides
        skips = []
        for stage in self.input_blocks:
            h = run(stage, h)  # (N, C_l, H_l, W_l)
            skips.append(h)
        h = run(self.middle_block, h)  # (N, C_max, H / f, W / f)
        for stage in self.output_blocks:
            h = run(stage, torch.cat([h, skips.pop()], dim=1))  # concat skip (ADM), (N, C_l, H_l, W_l)
        return self.out_conv(_group_norm(h, self.out_norm, self.moment_norm, silu=True))  # (N, out_channels, H, W)


# Registered sizes for 32x32x4 latents: ADM shapes (4 levels 32/16/8/4, 64-channel heads), width, depth and channel
# multipliers chosen so that forward FLOPs match DiT-{S,B,L,XL}/2 within 5% (docs/unet.md; tests/test_unet.py checks
# it against the real DiT models). Attention at 16x16, 8x8 and 4x4 (factors 2, 4, 8). UNet-S takes the first four of
# ADM's 128 px multipliers, (1, 1, 2, 3), at 128 channels, with attention at 8x8 and 4x4 only: its convolutions are
# then multiples of 128 wide (full tensor-core tiles), which trains 1.22x faster than (1, 2, 2, 2) at 96 channels for
# the same FLOPs, with 1.7x the parameters (docs/benchmarks.md, run 23).
_SIZES: dict[str, dict] = {
    "S": dict(model_channels=128, channel_mult=(1, 1, 2, 3), num_res_blocks=3, attention_resolutions=(4, 8)),
    "B": dict(model_channels=224, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attention_resolutions=(2, 4, 8)),
    "L": dict(model_channels=384, channel_mult=(1, 2, 2, 2), num_res_blocks=3, attention_resolutions=(2, 4, 8)),
    "XL": dict(model_channels=416, channel_mult=(1, 2, 2, 2), num_res_blocks=4, attention_resolutions=(2, 4, 8)),
}
_COMMON = dict(input_size=32, in_channels=4, num_head_channels=64, learn_sigma=True)

for _size, _cfg in _SIZES.items():
    register_model(f"UNet-{_size}", cls=UNet, **_COMMON, **_cfg, num_classes=1000)
    register_model(f"UNet-{_size}-T", cls=UNet, **_COMMON, **_cfg, num_classes=0, context_dim=384)
