"""Pretrained autoencoders behind one interface (see ``vae.base.Autoencoder`` and ``docs/architecture.md``)."""

from .base import Autoencoder
from .constants import NORM_FILENAME, SD_VAE_SCALE, SDXL_VAE_SCALE
from .diffusers_backends import KLAutoencoder, TinyAutoencoder
from .factory import load_autoencoder, parse_spec, read_norm_file
from .identity import IdentityAutoencoder
from .taef2 import TAEF2

__all__ = [
    "Autoencoder",
    "IdentityAutoencoder",
    "KLAutoencoder",
    "NORM_FILENAME",
    "SDXL_VAE_SCALE",
    "SD_VAE_SCALE",
    "TAEF2",
    "TinyAutoencoder",
    "load_autoencoder",
    "parse_spec",
    "read_norm_file",
]
