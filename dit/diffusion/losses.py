"""Likelihood helpers for the variational bound (Ho et al. 2020, Sec. 3.3; Nichol & Dhariwal 2021, Sec. 3.1)."""

from __future__ import annotations

import math

import torch


def normal_kl(
    mean1: torch.Tensor | float,
    logvar1: torch.Tensor | float,
    mean2: torch.Tensor | float,
    logvar2: torch.Tensor | float,
) -> torch.Tensor:
    """Elementwise ``KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2)))`` in nats; arguments broadcast.

    ``0.5 * (-1 + logvar2 - logvar1 + exp(logvar1 - logvar2) + (mean1 - mean2)^2 exp(-logvar2))``.
    At least one argument must be a tensor; scalars take its dtype and device.
    """
    ref = next((a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, torch.Tensor)), None)
    if ref is None:
        raise ValueError("normal_kl needs at least one tensor argument")
    # Python scalars are created directly in the reference dtype (ADM goes through float32 first; same for float32).
    logvar1, logvar2 = (
        a if isinstance(a, torch.Tensor) else torch.tensor(a, dtype=ref.dtype, device=ref.device)
        for a in (logvar1, logvar2)
    )
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + ((mean1 - mean2) ** 2) * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of the standard normal CDF used by ADM (absolute error below 2e-4)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The exact standard normal CDF, ``0.5 * (1 + erf(x / sqrt(2)))``."""
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, *, means: torch.Tensor, log_scales: torch.Tensor, exact_cdf: bool = False
) -> torch.Tensor:
    """Log-likelihood of data ``x`` in [-1, 1] quantised to 256 bins under ``N(means, exp(log_scales)^2)``.

    Each bin is ``[x - 1/255, x + 1/255]``; the edge bins extend to -inf / +inf (Ho et al. 2020, eq. 13).
    ``exact_cdf=False`` uses ADM's tanh CDF approximation (reproduces official numbers); True uses erf.
    All tensors have the same shape (N, ...); returns log-probabilities in nats with that shape.
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(
            f"x, means and log_scales must have one shape, got {tuple(x.shape)}, {tuple(means.shape)}, "
            f"{tuple(log_scales.shape)}"
        )
    cdf = standard_normal_cdf if exact_cdf else approx_standard_normal_cdf
    centered_x = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = cdf(inv_stdv * (centered_x + 1.0 / 255.0))
    cdf_min = cdf(inv_stdv * (centered_x - 1.0 / 255.0))
    # Clamp before the log so that far-away bins give a finite (very negative) value instead of -inf.
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions: (N, ...) -> (N,)."""
    return x.mean(dim=tuple(range(1, x.ndim)))
