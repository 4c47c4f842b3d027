"""Noise schedules: ``betas`` for the forward process ``q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)``.

All schedules are returned as float64 numpy arrays of shape (num_steps,), like OpenAI ADM / facebookresearch/DiT, so
that the derived tables (alpha-bar, posterior coefficients) are computed in double precision.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

SCHEDULES = ("linear", "cosine", "scaled_linear")
# ADM's name for the cosine schedule, accepted so that official configs port unchanged.
_ALIASES = {"squaredcos_cap_v2": "cosine"}


def betas_for_alpha_bar(num_steps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999) -> np.ndarray:
    """Betas that discretise a continuous ``alpha_bar(s)``, s in [0, 1]: ``beta_i = 1 - abar((i+1)/T) / abar(i/T)``.

    Each beta is capped at ``max_beta`` to avoid the singularity at s = 1 (Nichol & Dhariwal 2021, Sec. 3.2).
    Returns (num_steps,) float64.
    """
    betas = [
        min(1.0 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)
    ]
    return np.array(betas, dtype=np.float64)


def get_beta_schedule(
    name: str,
    num_steps: int,
    *,
    beta_start: float | None = None,
    beta_end: float | None = None,
    max_beta: float = 0.999,
) -> np.ndarray:
    """Named beta schedule -> (num_steps,) float64 betas.

    - ``linear``: ADM/DDPM, ``linspace(scale * 1e-4, scale * 0.02)`` with ``scale = 1000 / num_steps`` so that any
      step count approximates the 1000-step schedule (``beta_start``/``beta_end`` override the scaled ends).
    - ``cosine``: Nichol & Dhariwal 2021 eq. 17, ``abar(s) = cos^2((s + 0.008) / 1.008 * pi / 2)``, betas capped at
      ``max_beta`` (0.999). ``squaredcos_cap_v2`` is accepted as an alias.
    - ``scaled_linear``: LDM / Stable Diffusion, ``linspace(sqrt(beta_start), sqrt(beta_end)) ** 2`` with defaults
      0.00085 and 0.012.
    """
    key = _ALIASES.get(name, name)
    if key not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}; valid: {', '.join(SCHEDULES)}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if key == "linear":
        scale = 1000.0 / num_steps
        start = scale * 0.0001 if beta_start is None else beta_start
        end = scale * 0.02 if beta_end is None else beta_end
        return np.linspace(start, end, num_steps, dtype=np.float64)
    if key == "scaled_linear":
        start = 0.00085 if beta_start is None else beta_start
        end = 0.012 if beta_end is None else beta_end
        return np.linspace(start**0.5, end**0.5, num_steps, dtype=np.float64) ** 2
    if beta_start is not None or beta_end is not None:
        raise ValueError("the cosine schedule takes no beta_start/beta_end (it is defined by alpha-bar)")
    return betas_for_alpha_bar(
        num_steps, lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2, max_beta=max_beta
    )
