"""The diffusion core: schedules, Gaussian diffusion (ADM numerics), respacing, guidance and diffusers samplers.

Takes any callable ``model(x, t, **model_kwargs)``; never imports ``dit.models``.
"""

from __future__ import annotations

from typing import Sequence

from .diffusers_samplers import SAMPLERS, make_scheduler, sample_with_diffusers
from .gaussian import GaussianDiffusion
from .guidance import classifier_free_guidance, guided_fraction, official_cfg_forward, sigma_interval_to_timesteps
from .losses import approx_standard_normal_cdf, discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .respace import SpacedDiffusion, space_timesteps
from .schedules import SCHEDULES, betas_for_alpha_bar, get_beta_schedule


def create_diffusion(
    timestep_respacing: str | Sequence[int] | None = "",
    noise_schedule: str = "linear",
    diffusion_steps: int = 1000,
    learn_sigma: bool = True,
    prediction: str = "eps",
    loss: str = "hybrid",
    sigma_small: bool = False,
) -> SpacedDiffusion:
    """A ``SpacedDiffusion`` like facebookresearch/DiT's ``create_diffusion``.

    ``timestep_respacing``: ``""``/None (all ``diffusion_steps``), ``"250"``, ``"10,20,30"``, ``"ddim50"`` or a list
    of section counts. With the defaults this is DiT's training diffusion; ``create_diffusion("250")`` its sampler.
    ``learn_sigma=False`` uses the fixed-large variance (beta_t) unless ``sigma_small``, like DiT.
    """
    betas = get_beta_schedule(noise_schedule, diffusion_steps)
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    return SpacedDiffusion(
        space_timesteps(diffusion_steps, timestep_respacing),
        betas=betas,
        prediction=prediction,
        learn_sigma=learn_sigma,
        loss=loss,
        sigma_small=sigma_small,
    )


def guidance_timesteps(sigma_lo: float, sigma_hi: float, **diffusion_kwargs) -> tuple[int, int]:
    """An EDM sigma range ``(sigma_lo, sigma_hi]`` as ``(t_lo, t_hi)`` in the original (un-respaced) timesteps of
    ``create_diffusion(**diffusion_kwargs)``'s schedule: the ``interval`` of ``classifier_free_guidance``."""
    base = create_diffusion(timestep_respacing="", **diffusion_kwargs)
    return sigma_interval_to_timesteps(base.alphas_cumprod, sigma_lo, sigma_hi)


__all__ = [
    "GaussianDiffusion",
    "SpacedDiffusion",
    "SAMPLERS",
    "SCHEDULES",
    "approx_standard_normal_cdf",
    "betas_for_alpha_bar",
    "classifier_free_guidance",
    "create_diffusion",
    "discretized_gaussian_log_likelihood",
    "get_beta_schedule",
    "guidance_timesteps",
    "guided_fraction",
    "make_scheduler",
    "mean_flat",
    "normal_kl",
    "official_cfg_forward",
    "sample_with_diffusers",
    "sigma_interval_to_timesteps",
    "space_timesteps",
]
