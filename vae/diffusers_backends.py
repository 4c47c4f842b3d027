"""Backends wrapping diffusers autoencoders: ``AutoencoderKL`` (SD/SDXL/FLUX VAEs) and ``AutoencoderTiny`` (TAESD).

diffusers is imported lazily (it is slow to import and not needed for the TAEF2/identity backends).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .base import Autoencoder
from .constants import SD_VAE_SCALE

SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def _diffusers_dir(path: Path, what: str) -> tuple[Path, str | None]:
    """A local diffusers model folder -> (folder, subfolder): the folder itself, or a pipeline folder's ``vae/``."""
    if (path / "config.json").is_file():
        return path, None
    if (path / "vae" / "config.json").is_file():
        return path, "vae"
    raise FileNotFoundError(
        f"{path}: expected a diffusers {what} folder (config.json + weights) or a pipeline folder with vae/config.json"
    )


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    model.requires_grad_(False)
    return model.eval()


class KLAutoencoder(Autoencoder):
    """diffusers ``AutoencoderKL`` (LDM KL-f8 VAEs: sd-vae-ft-ema/mse, SDXL, ...).

    The encoder outputs a diagonal Gaussian posterior; ``encode`` returns its mean by default (deterministic) or a
    sample ``mean + std * eps`` with ``sample_posterior=True`` (LDM paper, App. G; eps drawn from ``generator``).
    Default normalisation is the model config's ``scaling_factor`` (diffusers' default = ``SD_VAE_SCALE``) and
    ``shift_factor``.
    """

    stochastic = True

    def __init__(self, vae: torch.nn.Module, *, spec: str, scale=None, shift=None, **kwargs):
        cfg = vae.config
        if scale is None:
            scale = float(getattr(cfg, "scaling_factor", None) or SD_VAE_SCALE)
        if shift is None:
            shift = getattr(cfg, "shift_factor", None)
        super().__init__(
            spec=spec,
            latent_channels=int(cfg.latent_channels),
            downsample_factor=2 ** (len(cfg.block_out_channels) - 1),
            scale=scale,
            shift=shift,
            **kwargs,
        )
        self.vae = _frozen(vae)

    @classmethod
    def load(cls, target: str, *, spec: str, config: str | None = None, **kwargs) -> "KLAutoencoder":
        """Load from a hub id (``org/name`` or ``org/name/subfolder``), a local diffusers folder, or one
        ``.safetensors``/``.ckpt`` file (``config``: a diffusers config folder or hub id for ``from_single_file``)."""
        from diffusers import AutoencoderKL

        return cls(_load_diffusers(AutoencoderKL, target, "AutoencoderKL", config=config), spec=spec, **kwargs)

    def _encode_raw(self, images: torch.Tensor, sample: bool, generator: torch.Generator | None) -> torch.Tensor:
        posterior = self.vae.encode(images).latent_dist  # mean, std: (n, C, h, w)
        mean = posterior.mean
        if not sample:
            return mean
        gen_device = generator.device if generator is not None else mean.device
        eps = torch.randn(mean.shape, generator=generator, device=gen_device, dtype=torch.float32)
        return mean.float() + posterior.std.float() * eps.to(mean.device)

    def _decode_raw(self, raw: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(raw).sample  # (n, 3, H, W) in ~[-1, 1]


class TinyAutoencoder(Autoencoder):
    """diffusers ``AutoencoderTiny`` (TAESD family: madebyollin/taesd, taesdxl, ...), deterministic.

    The original TAESD nets work on [0, 1] images; diffusers' ``EncoderTiny`` maps [-1, 1] -> [0, 1] on the way in
    and ``DecoderTiny`` maps back on the way out, so this wrapper passes [-1, 1] images through unchanged. TAESD
    latents already match SD's *scaled* latents, hence the config's ``scaling_factor`` (1.0) is the default scale.
    """

    def __init__(self, vae: torch.nn.Module, *, spec: str, scale=None, shift=None, **kwargs):
        cfg = vae.config
        if scale is None:
            scale = float(getattr(cfg, "scaling_factor", 1.0))
        super().__init__(
            spec=spec,
            latent_channels=int(cfg.latent_channels),
            downsample_factor=2 ** (len(cfg.encoder_block_out_channels) - 1),
            scale=scale,
            shift=shift,
            **kwargs,
        )
        self.vae = _frozen(vae)

    @classmethod
    def load(cls, target: str, *, spec: str, **kwargs) -> "TinyAutoencoder":
        """Load from a hub id (``org/name``) or a local diffusers ``AutoencoderTiny`` folder."""
        from diffusers import AutoencoderTiny

        return cls(_load_diffusers(AutoencoderTiny, target, "AutoencoderTiny", single_file=False), spec=spec, **kwargs)

    def _encode_raw(self, images: torch.Tensor, sample: bool, generator: torch.Generator | None) -> torch.Tensor:
        return self.vae.encode(images).latents  # (n, C, h, w)

    def _decode_raw(self, raw: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(raw).sample  # (n, 3, H, W) in ~[-1, 1]


def is_hub_id(target: str) -> bool:
    """``org/name`` or ``org/name/subfolder`` made of hub-legal characters, and not an existing local path."""
    parts = target.split("/")
    legal = all(p and all(ch.isalnum() or ch in "-_." for ch in p) and p not in (".", "..") for p in parts)
    return legal and 2 <= len(parts) and not target.startswith(("~", ".")) and not Path(target).exists()


def _load_diffusers(model_cls: Any, target: str, what: str, *, config: str | None = None, single_file: bool = True):
    """``target`` (local folder, single weights file, or hub id) -> a diffusers model; clear errors otherwise."""
    path = Path(target).expanduser()
    if path.exists():
        if path.is_dir():
            folder, subfolder = _diffusers_dir(path, what)
            try:
                return model_cls.from_pretrained(folder, subfolder=subfolder, local_files_only=True)
            except Exception as e:
                raise ValueError(f"{path}: could not load a diffusers {what} ({type(e).__name__}: {e})") from None
        if single_file and path.suffix in SINGLE_FILE_SUFFIXES:
            try:
                return model_cls.from_single_file(str(path), config=config)
            except Exception as e:
                hint = "" if config else "; pass config=<diffusers config folder or hub id> when offline"
                msg = f"{path}: could not load a single-file {what} ({type(e).__name__}: {e}){hint}"
                raise ValueError(msg) from None
        expected = "a diffusers folder" + (f" or a {'/'.join(SINGLE_FILE_SUFFIXES)} file" if single_file else "")
        raise ValueError(f"{path}: expected {expected} for {what}")
    if not is_hub_id(target):
        raise FileNotFoundError(f"{target}: no such file or folder, and not a hub id (org/name) for {what}")
    parts = target.split("/")
    repo, subfolder = "/".join(parts[:2]), ("/".join(parts[2:]) or None)
    try:
        return model_cls.from_pretrained(repo, subfolder=subfolder)
    except Exception as e:
        raise OSError(
            f"{target}: could not load {what} from the Hugging Face hub ({type(e).__name__}: {e}); "
            "offline, pass a local diffusers folder instead"
        ) from None
