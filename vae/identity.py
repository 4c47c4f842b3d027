"""Pixel-space "autoencoder": latents are the images themselves (f = 1, C = 3), exactly invertible."""

from __future__ import annotations

import torch

from .base import Autoencoder


class IdentityAutoencoder(Autoencoder):
    """``encode(x) = (x - shift) * scale``, ``decode`` its inverse; no weights, runs on the input's device and
    dtype (exact round trip in float64)."""

    compute_dtype = None

    def __init__(self, *, spec: str = "identity", scale=None, shift=None, **kwargs):
        super().__init__(
            spec=spec, latent_channels=3, downsample_factor=1, scale=1.0 if scale is None else scale, shift=shift,
            **kwargs,
        )

    def _encode_raw(self, images: torch.Tensor, sample: bool, generator: torch.Generator | None) -> torch.Tensor:
        return images

    def _decode_raw(self, raw: torch.Tensor) -> torch.Tensor:
        return raw
