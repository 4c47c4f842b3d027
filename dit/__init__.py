"""dit: latent diffusion transformers and an ADM-style UNet baseline on one diffusion core."""

__version__ = "0.1.0"
