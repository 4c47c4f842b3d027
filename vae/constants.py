"""Latent normalisation constants, defined once for the whole project.

A diffusion model is trained on ``(z - shift) * scale`` where ``z`` are the autoencoder's raw latents, so that the
latents have roughly unit variance (LDM paper, Rombach et al. 2022, Sec. 4.3.2 and App. D.1).
"""

from __future__ import annotations

# Stable Diffusion 1.x/2.x KL-f8 VAEs (sd-vae-ft-ema, sd-vae-ft-mse, ...): 1 / std of the raw latents.
SD_VAE_SCALE: float = 0.18215
# SDXL's KL-f8 VAE (stabilityai/sdxl-vae).
SDXL_VAE_SCALE: float = 0.13025

# Name of the small JSON (written by ``tools/measure_vae.py``) looked up next to an autoencoder's weights; holds
# ``{"scale": float | [C floats], "shift": null | [C floats], ...}``.
NORM_FILENAME: str = "latent_norm.json"
