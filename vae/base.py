"""The one autoencoder interface the rest of the project uses.

Every backend maps images ``(N, 3, H, W)`` in ``[-1, 1]`` to *normalised* latents ``(N, C, H/f, W/f)``,
``latents = (raw - shift) * scale`` (LDM paper, Rombach et al. 2022, Sec. 4.3.2), and back. Backends only implement
``_encode_raw`` / ``_decode_raw``; batching, device moves, autocast, input checks, normalisation and the fingerprint
live here once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from typing import Iterator, Sequence

import torch
from torch import nn

_AUTOCAST_DTYPES = (torch.float16, torch.bfloat16)
# Decoders overshoot [-1, 1] a little and resampled images can too; values far outside mean the wrong convention
# (e.g. [0, 255] or [0, 1]-then-forgot-to-shift images with large negatives).
_RANGE_TOLERANCE = 0.1


def _as_norm_tensor(value: float | Sequence[float] | torch.Tensor, channels: int, what: str) -> torch.Tensor:
    """Validate a per-channel normalisation constant -> float32 tensor (C,)."""
    t = torch.as_tensor(value, dtype=torch.float64).flatten()
    if t.numel() == 1:
        t = t.expand(channels).clone()
    if t.numel() != channels:
        raise ValueError(f"{what}: expected a float or {channels} per-channel values, got {t.numel()} values")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{what}: expected finite values, got {t.tolist()}")
    return t.float()


class Autoencoder(nn.Module):
    """Base class: a frozen pretrained autoencoder with latent normalisation.

    Attributes: ``latent_channels`` (C), ``downsample_factor`` (f), ``scale`` (float, or per-channel tensor (C,)),
    ``shift`` (None or per-channel tensor (C,)), ``spec`` (the string it was loaded from), ``stochastic`` (True when
    the encoder outputs a Gaussian posterior, i.e. KL VAEs).

    Args:
        spec: the spec string it was loaded from (kept for manifests and error messages).
        latent_channels, downsample_factor: latent geometry.
        scale, shift: normalisation ``(raw - shift) * scale``; ``scale`` a positive float or C values, ``shift``
            None, a float (broadcast to every channel) or C values.
        dtype: autocast dtype (``torch.bfloat16`` / ``torch.float16``) used on CUDA; weights stay float32. ``None``
            or ``torch.float32`` means full precision. Ignored on CPU.
        batch_size: default number of images per forward pass (large inputs are split).
        sample_posterior: KL VAEs only: sample ``z ~ N(mean, std)`` instead of the deterministic posterior mean.
    """

    stochastic: bool = False
    # dtype fed to the backend's networks; None keeps the input's dtype (weightless backends, exact in float64).
    compute_dtype: torch.dtype | None = torch.float32

    def __init__(
        self,
        *,
        spec: str,
        latent_channels: int,
        downsample_factor: int,
        scale: float | Sequence[float] | torch.Tensor = 1.0,
        shift: float | Sequence[float] | torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
        batch_size: int = 32,
        sample_posterior: bool = False,
    ):
        super().__init__()
        if dtype is not None and dtype not in (*_AUTOCAST_DTYPES, torch.float32):
            raise ValueError(f"dtype: expected None, torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
        if batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size}")
        if sample_posterior and not self.stochastic:
            raise ValueError(f"sample_posterior=True: {type(self).__name__} has a deterministic encoder (KL VAEs only)")
        self.spec = spec
        self.latent_channels = int(latent_channels)
        self.downsample_factor = int(downsample_factor)
        self.dtype = None if dtype == torch.float32 else dtype
        self.batch_size = int(batch_size)
        self.sample_posterior = bool(sample_posterior)
        self._weights_hash: str | None = None
        self.set_normalization(scale=scale, shift=shift)

    # ------------------------------------------------------------------ normalisation
    def set_normalization(
        self,
        *,
        scale: float | Sequence[float] | torch.Tensor = 1.0,
        shift: float | Sequence[float] | torch.Tensor | None = None,
    ) -> None:
        """Set ``scale`` (positive float or (C,)) and ``shift`` (None, float or (C,)) of ``(raw - shift) * scale``."""
        c = self.latent_channels
        if isinstance(scale, (int, float)) and not isinstance(scale, bool):
            if not (math.isfinite(scale) and scale > 0):
                raise ValueError(f"scale: expected a positive finite float, got {scale}")
            scale_value: float | torch.Tensor = float(scale)
        else:
            scale_value = _as_norm_tensor(scale, c, "scale")
            if not bool((scale_value > 0).all()):
                raise ValueError(f"scale: expected positive values, got {scale_value.tolist()}")
        shift_value = None if shift is None else _as_norm_tensor(shift, c, "shift")
        device = self._anchor_device()
        for name in ("scale", "shift"):
            if name in self._buffers:
                del self._buffers[name]
            elif hasattr(self, name):
                delattr(self, name)
        # Tensors are non-persistent buffers: they follow .to(device) but stay out of state_dict / the weights hash.
        if isinstance(scale_value, torch.Tensor):
            self.register_buffer("scale", scale_value.to(device), persistent=False)
        else:
            self.scale = scale_value
        if shift_value is None:
            self.shift = None
        else:
            self.register_buffer("shift", shift_value.to(device), persistent=False)

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw latents (N, C, h, w) -> normalised ``(raw - shift) * scale``."""
        z = raw
        if self.shift is not None:
            z = z - self.shift.to(z)[None, :, None, None]
        if isinstance(self.scale, torch.Tensor):
            return z * self.scale.to(z)[None, :, None, None]
        return z * self.scale

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents (N, C, h, w) -> raw ``latents / scale + shift``."""
        if isinstance(self.scale, torch.Tensor):
            z = latents / self.scale.to(latents)[None, :, None, None]
        else:
            z = latents / self.scale
        if self.shift is not None:
            z = z + self.shift.to(z)[None, :, None, None]
        return z

    # ------------------------------------------------------------------ backend hooks
    def _encode_raw(self, images: torch.Tensor, sample: bool, generator: torch.Generator | None) -> torch.Tensor:
        """images (n, 3, H, W) in [-1, 1] on the model device -> raw latents (n, C, H/f, W/f)."""
        raise NotImplementedError

    def _decode_raw(self, raw: torch.Tensor) -> torch.Tensor:
        """raw latents (n, C, h, w) on the model device -> images (n, 3, h*f, w*f), nominally in [-1, 1]."""
        raise NotImplementedError

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def encode(
        self,
        images: torch.Tensor,
        *,
        batch_size: int | None = None,
        sample_posterior: bool | None = None,
        generator: torch.Generator | None = None,
        raw: bool = False,
    ) -> torch.Tensor:
        """Images (N, 3, H, W) in [-1, 1] -> normalised latents (N, C, H/f, W/f) (raw latents with ``raw=True``).

        Runs in chunks of ``batch_size`` on the model's device; the result is on the input's device and dtype.
        ``sample_posterior`` overrides the constructor default (KL VAEs only); ``generator`` drives the sampling.
        """
        self._check_images(images)
        sample = self.sample_posterior if sample_posterior is None else bool(sample_posterior)
        if sample and not self.stochastic:
            raise ValueError(f"sample_posterior=True: {type(self).__name__} has a deterministic encoder (KL VAEs only)")
        out = []
        for chunk in self._chunks(images, batch_size):
            x = self._to_model(chunk)  # (n, 3, H, W) float32 on the model device
            with self._autocast(x.device):
                z = self._encode_raw(x, sample, generator)  # (n, C, h, w)
            z = z.to(torch.promote_types(z.dtype, torch.float32))  # autocast outputs -> float32
            if not raw:
                z = self.normalize(z)
            out.append(z.to(device=images.device, dtype=images.dtype))
        return torch.cat(out)

    @torch.no_grad()
    def decode(
        self, latents: torch.Tensor, *, batch_size: int | None = None, raw: bool = False, clamp: bool = True
    ) -> torch.Tensor:
        """Normalised latents (N, C, h, w) (raw ones with ``raw=True``) -> images (N, 3, h*f, w*f) in [-1, 1].

        ``clamp=False`` returns the decoder's unclamped output. Result on the input's device and dtype.
        """
        self._check_latents(latents)
        out = []
        for chunk in self._chunks(latents, batch_size):
            z = chunk.to(device=self._model_device(chunk), dtype=torch.promote_types(chunk.dtype, torch.float32))
            if not raw:
                z = self.denormalize(z)
            z = self._memory_format(z.to(self.compute_dtype or z.dtype))
            with self._autocast(z.device):
                x = self._decode_raw(z)  # (n, 3, H, W)
            x = x.to(torch.promote_types(x.dtype, torch.float32))
            if clamp:
                x = x.clamp(-1.0, 1.0)
            out.append(x.to(device=latents.device, dtype=latents.dtype))
        return torch.cat(out)

    def fingerprint(self) -> str:
        """A short (16 hex chars) stable hash of the backend, its weights and its normalisation.

        Used in latent manifests: latents extracted with a different fingerprint are not interchangeable.
        """
        if self._weights_hash is None:  # weights are frozen: hash them once
            h = hashlib.sha256()
            for name, t in sorted(self.state_dict().items()):
                t = t.detach().cpu().contiguous()
                h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            self._weights_hash = h.hexdigest()
        scale = self.scale.tolist() if isinstance(self.scale, torch.Tensor) else self.scale
        shift = None if self.shift is None else self.shift.tolist()
        meta = json.dumps(
            {
                "backend": type(self).__name__,
                "weights": self._weights_hash,
                "latent_channels": self.latent_channels,
                "downsample_factor": self.downsample_factor,
                "scale": scale,
                "shift": shift,
            },
            sort_keys=True,
        )
        return hashlib.sha256(meta.encode()).hexdigest()[:16]

    def extra_repr(self) -> str:
        scale = [round(v, 5) for v in self.scale.tolist()] if isinstance(self.scale, torch.Tensor) else self.scale
        return (
            f"spec={self.spec!r}, latent_channels={self.latent_channels}, "
            f"downsample_factor={self.downsample_factor}, scale={scale}, shifted={self.shift is not None}"
        )

    # ------------------------------------------------------------------ helpers
    def _anchor_device(self) -> torch.device:
        for t in self.parameters():
            return t.device
        return torch.device("cpu")

    def _model_device(self, like: torch.Tensor) -> torch.device:
        """The device computations run on: the weights' device, or the input's for weightless backends."""
        for t in self.parameters():
            return t.device
        return like.device

    def _memory_format(self, x: torch.Tensor) -> torch.Tensor:
        # cuDNN convolutions are faster in NHWC; the factory puts CUDA weights in channels_last too.
        if x.device.type == "cuda":
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def _to_model(self, chunk: torch.Tensor) -> torch.Tensor:
        x = chunk.to(device=self._model_device(chunk), dtype=self.compute_dtype or chunk.dtype, non_blocking=True)
        return self._memory_format(x)

    def _autocast(self, device: torch.device):
        if self.dtype in _AUTOCAST_DTYPES and device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=self.dtype)
        return contextlib.nullcontext()

    def _chunks(self, x: torch.Tensor, batch_size: int | None) -> Iterator[torch.Tensor]:
        bs = self.batch_size if batch_size is None else int(batch_size)
        if bs < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {bs}")
        return iter(x.split(bs))

    def _check_images(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"{self.spec}: encode expects images of shape (N, 3, H, W), got {shape}")
        if not images.is_floating_point():
            raise ValueError(f"{self.spec}: encode expects float images in [-1, 1], got dtype {images.dtype}")
        f = self.downsample_factor
        if images.shape[2] % f or images.shape[3] % f:
            raise ValueError(
                f"{self.spec}: image size {tuple(images.shape[2:])} must be divisible by the downsample factor {f}"
            )
        if images.numel():
            lo, hi = torch.aminmax(images)
            if lo < -1 - _RANGE_TOLERANCE or hi > 1 + _RANGE_TOLERANCE:
                raise ValueError(
                    f"{self.spec}: encode expects images in [-1, 1], got values in [{lo.item():.3g}, {hi.item():.3g}]"
                )

    def _check_latents(self, latents: torch.Tensor) -> None:
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(
                f"{self.spec}: decode expects latents of shape (N, {self.latent_channels}, h, w), got {shape}"
            )
        if not latents.is_floating_point():
            raise ValueError(f"{self.spec}: decode expects float latents, got dtype {latents.dtype}")
