"""Fast samplers from diffusers (DPM-Solver++, Euler, DDIM) driven by our diffusion and any model.

The scheduler is built from our (original, un-respaced) betas via ``trained_betas`` so that its alpha-bars are the
model's training alpha-bars; the model is called on the scheduler's integer timesteps in 0..T-1 (the training scale)
and only its prediction channels are fed to ``scheduler.step`` (learned-variance channels are dropped: these
samplers use their own step sizes).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from .gaussian import GaussianDiffusion

SAMPLERS = ("dpmsolver++", "euler", "ddim")
_PREDICTION_TYPES = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}


def make_scheduler(name: str, betas: np.ndarray, prediction: str = "eps", **scheduler_kwargs: Any):
    """A diffusers scheduler over ``betas`` (T,): ``"dpmsolver++"`` (2nd-order multistep, Lu et al. 2022),
    ``"euler"`` (Karras et al. 2022 Euler in sigma space, trailing integer timesteps) or ``"ddim"`` (eta = 0;
    leading spacing with alpha-bar_prev = 1 at the last step, i.e. the same steps as ADM's ``ddimN``).
    ``scheduler_kwargs`` override the defaults chosen here.
    """
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    if name not in SAMPLERS:
        raise ValueError(f"unknown diffusers sampler {name!r}; valid: {', '.join(SAMPLERS)}")
    if prediction not in _PREDICTION_TYPES:
        raise ValueError(f"prediction must be one of {', '.join(_PREDICTION_TYPES)}, got {prediction!r}")
    common = dict(
        num_train_timesteps=len(betas), trained_betas=np.asarray(betas), prediction_type=_PREDICTION_TYPES[prediction]
    )
    if name == "dpmsolver++":
        cfg = dict(common, algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True)
        return DPMSolverMultistepScheduler(**{**cfg, **scheduler_kwargs})
    if name == "euler":
        cfg = dict(common, timestep_spacing="trailing")
        return EulerDiscreteScheduler(**{**cfg, **scheduler_kwargs})
    cfg = dict(common, clip_sample=False, set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
    return DDIMScheduler(**{**cfg, **scheduler_kwargs})


def model_timestep(t: float | torch.Tensor, num_train: int) -> int:
    """The integer training timestep (0..T-1) the model is called with at scheduler timestep ``t``: the model was
    trained on integer indices, and diffusers may hold its timesteps as floats."""
    return min(max(int(round(float(t))), 0), num_train - 1)


def sample_with_diffusers(
    model: Callable[..., torch.Tensor],
    betas_or_diffusion: GaussianDiffusion | np.ndarray | torch.Tensor,
    name: str,
    num_steps: int,
    shape: tuple[int, ...] | list[int] | torch.Size,
    noise: torch.Tensor | None = None,
    model_kwargs: dict | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    prediction: str = "eps",
    device: torch.device | str | None = None,
    scheduler_kwargs: dict | None = None,
) -> torch.Tensor:
    """Sample (N, C, ...) = shape with a diffusers scheduler and ``model(x, t, **model_kwargs)``.

    ``betas_or_diffusion``: the training betas (T,) or a (Spaced)GaussianDiffusion, whose original betas and
    ``prediction`` are then used (the ``prediction`` argument is ignored). The model output may have C or 2C
    channels; the first C are the prediction. Initial noise is ``torch.randn(shape, generator=generator)`` unless
    given, scaled by the scheduler's ``init_noise_sigma``.
    """
    if isinstance(betas_or_diffusion, GaussianDiffusion):
        betas = getattr(betas_or_diffusion, "base_betas", betas_or_diffusion.betas)
        prediction = betas_or_diffusion.prediction
    elif isinstance(betas_or_diffusion, torch.Tensor):
        betas = betas_or_diffusion.detach().cpu().double().numpy()
    else:
        betas = np.asarray(betas_or_diffusion, dtype=np.float64)
    if betas.ndim != 1 or len(betas) < 2:
        raise ValueError(f"betas must be a 1-D schedule of at least 2 steps, got shape {betas.shape}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= len(betas):
        raise ValueError(f"num_steps must be an integer in 1..{len(betas)}, got {num_steps!r}")
    scheduler = make_scheduler(name, betas, prediction, **(scheduler_kwargs or {}))
    model_kwargs = {} if model_kwargs is None else model_kwargs
    if device is None:
        device = noise.device if noise is not None else torch.device("cpu")
    device = torch.device(device)
    if noise is None:
        noise = torch.randn(tuple(shape), generator=generator, device=device)
    elif tuple(noise.shape) != tuple(shape):
        raise ValueError(f"noise shape {tuple(noise.shape)} != requested shape {tuple(shape)}")
    scheduler.set_timesteps(num_steps, device=device)
    x = noise.to(device) * scheduler.init_noise_sigma
    n, c = x.shape[:2]
    num_train = len(betas)
    timesteps = scheduler.timesteps
    if progress:
        from tqdm.auto import tqdm

        timesteps = tqdm(timesteps)
    with torch.no_grad():
        for t in timesteps:
            t_int = model_timestep(t, num_train)
            t_model = torch.full((n,), t_int, dtype=torch.long, device=device)
            model_in = scheduler.scale_model_input(x, t)  # Euler: x / sqrt(sigma^2 + 1); identity for the others
            out = model(model_in, t_model, **model_kwargs)  # (N, C or 2C, ...)
            if out.shape[0] != n or out.shape[1] < c:
                raise ValueError(f"model output {tuple(out.shape)} does not start with {c} prediction channels")
            x = scheduler.step(out[:, :c], t, x, generator=generator).prev_sample
    return x
