"""Classifier-free guidance (Ho & Salimans 2022): ``eps = eps_u + s * (eps_c - eps_u)``.

Two wrappers turn a conditional model into a callable with the model's signature ``guided(x, t, **kwargs)``:

- ``classifier_free_guidance``: the standard form. It takes an ordinary batch, runs one model call on the doubled
  batch ``[x; x]`` with ``[cond; uncond]`` kwargs, and guides all prediction channels.
- ``official_cfg_forward``: facebookresearch/DiT's ``forward_with_cfg`` convention, for reproducing official
  samples bit for bit. It expects the *caller* to have doubled the batch already, the way DiT's ``sample.py`` does::

      z = torch.randn(n, 4, h, w, device=device)        # the only initial draw
      z = torch.cat([z, z], 0)                           # doubled noise
      y = torch.cat([labels, torch.full_like(labels, 1000)], 0)   # cond labels, then the null class
      guided = official_cfg_forward(model, scale=4.0)
      samples = diffusion.p_sample_loop(guided, z.shape, z, model_kwargs=dict(y=y), device=device)
      samples, _ = samples.chunk(2, dim=0)               # keep the conditional half

  Because the sampler then draws its per-step noise for the doubled shape, exactly as the official loop does, the
  random stream (and so the samples) match the official ones for the same seed.

Guidance in a limited interval (Kynkaenniemi et al. 2024, "Applying Guidance in a Limited Interval Improves Sample
and Distribution Quality in Diffusion Models", arXiv:2404.07724): ``classifier_free_guidance(..., interval=(lo, hi))``
guides only where ``lo < t <= hi`` and calls the model once on the plain batch elsewhere. The paper chooses the interval
in EDM noise levels sigma (guidance at high noise hurts diversity, at low noise it does little);
``sigma_interval_to_timesteps`` turns such a range into timesteps of a VP schedule.

Timestep units: the interval is compared with the ``t`` the guided callable receives. The samplers of this package call
it with ORIGINAL diffusion timesteps (0..T-1 of the training schedule) even when respaced: ``GaussianDiffusion``
wraps whatever model it is given, here the guided callable, with ``SpacedDiffusion._wrap_model``, which maps the
respaced index i to ``timestep_map[i]`` before the call; ``sample_with_diffusers`` passes the scheduler's integer
training timesteps. So the interval is in original timesteps for every sampler.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

Model = Callable[..., torch.Tensor]


def _check_scale(scale: float) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"guidance scale must be a number, got {scale!r}")
    return float(scale)


def _double_kwargs(cond_kwargs: dict[str, Any], uncond_kwargs: dict[str, Any], n: int) -> dict[str, Any]:
    """Concatenate conditional then unconditional kwargs along dim 0.

    Tensor values present in both are concatenated (an unconditional tensor with leading size 1, e.g. one null
    text embedding, is broadcast to the batch); tensors given only as conditional are duplicated (they are not
    conditions, e.g. a resolution embedding); non-tensor values pass through from ``cond_kwargs``.
    """
    unknown = sorted(set(uncond_kwargs) - set(cond_kwargs))
    if unknown:
        raise ValueError(f"uncond_kwargs has keys {unknown} that the conditional call does not pass")
    out: dict[str, Any] = {}
    for key, c in cond_kwargs.items():
        if not isinstance(c, torch.Tensor):
            out[key] = c
            continue
        u = uncond_kwargs.get(key, c)
        if not isinstance(u, torch.Tensor):
            raise ValueError(f"uncond_kwargs[{key!r}] must be a tensor like the conditional value")
        if c.shape[0] != n:
            raise ValueError(f"conditional kwarg {key!r} has batch size {c.shape[0]}, expected {n}")
        if u.shape[0] == 1 and n != 1:
            u = u.expand(n, *u.shape[1:])
        if u.shape != c.shape:
            raise ValueError(
                f"uncond_kwargs[{key!r}] has shape {tuple(u.shape)}, expected {tuple(c.shape)} (or leading size 1)"
            )
        out[key] = torch.cat([c, u.to(device=c.device, dtype=c.dtype)], dim=0)
    return out


def _check_interval(interval: Sequence[float] | None) -> tuple[float, float] | None:
    if interval is None:
        return None
    ok = (
        isinstance(interval, (tuple, list)) and len(interval) == 2
        and all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) for v in interval)
    )
    if not ok or not interval[0] < interval[1]:  # also rejects NaN
        raise ValueError(f"guidance interval must be two numbers (lo, hi) with lo < hi, got {interval!r}")
    return float(interval[0]), float(interval[1])


def classifier_free_guidance(
    model: Model,
    scale: float,
    uncond_kwargs: dict[str, Any],
    pred_channels: int | None = None,
    interval: Sequence[float] | None = None,
) -> Callable[..., torch.Tensor]:
    """Wrap ``model`` into ``guided(x, t, **cond_kwargs)`` returning the guided output (N, C_out, ...).

    One model call on ``cat([x, x])`` (2N, C, ...) with ``cond_kwargs`` then ``uncond_kwargs`` concatenated along
    dim 0 (e.g. ``uncond_kwargs={"y": torch.full((N,), num_classes)}``). The first ``pred_channels`` output channels
    (default: ``x.shape[1]``, i.e. the prediction part whether or not the model learns sigma) become
    ``u + scale * (c - u)``; the remaining channels (learned variance values) come from the conditional branch.
    ``scale = 1`` is the conditional model, ``scale = 0`` the unconditional one.

    ``interval=(t_lo, t_hi)``: guide only samples with ``t_lo < t <= t_hi``, t in the units the callable receives,
    i.e. original diffusion timesteps under every sampler here (module docstring; ``sigma_interval_to_timesteps``
    converts an EDM sigma range). If no sample of the batch is inside, the model is called once on the plain batch
    (N, not 2N) and its output returned unchanged (scale ignored); if only some are, the doubled call is made and the
    rows outside take the conditional output (all channels). ``None``: guide every step (the standard form).
    """
    scale = _check_scale(scale)
    if pred_channels is not None and pred_channels < 1:
        raise ValueError(f"pred_channels must be a positive channel count, got {pred_channels}")
    bounds = _check_interval(interval)

    def guided(x: torch.Tensor, t: torch.Tensor, **cond_kwargs: Any) -> torch.Tensor:
        n = x.shape[0]
        inside = None
        if bounds is not None:
            # Whether to run N or 2N rows is a host decision, so t is read on the host: one device sync per step.
            lo, hi = bounds
            inside = [lo < v <= hi for v in t.tolist()]
            if not any(inside):
                return model(x, t, **cond_kwargs)  # conditional only: half the compute of a guided step
        kwargs = _double_kwargs(cond_kwargs, uncond_kwargs, n)
        out = model(torch.cat([x, x], dim=0), torch.cat([t, t], dim=0), **kwargs)  # (2N, C_out, ...)
        cond, uncond = out[:n], out[n:]
        k = x.shape[1] if pred_channels is None else pred_channels
        if k > out.shape[1]:
            raise ValueError(f"pred_channels={k} exceeds the model's {out.shape[1]} output channels")
        guided_pred = uncond[:, :k] + scale * (cond[:, :k] - uncond[:, :k])  # (N, k, ...)
        res = torch.cat([guided_pred, cond[:, k:]], dim=1)
        if inside is not None and not all(inside):  # a batch mixing timesteps: unguided rows are the conditional ones
            mask = torch.tensor(inside, device=res.device).view(-1, *([1] * (res.ndim - 1)))
            res = torch.where(mask, res, cond)
        return res

    return guided


def sigma_interval_to_timesteps(
    alphas_cumprod: np.ndarray | torch.Tensor | Sequence[float], sigma_lo: float, sigma_hi: float
) -> tuple[int, int]:
    """Integer timesteps ``(t_lo, t_hi)``: ``t_lo < t <= t_hi`` exactly when ``sigma_lo < sigma_t <= sigma_hi``.

    ``alphas_cumprod``: (T,) alpha-bars of the ORIGINAL schedule, e.g. ``create_diffusion(**kw).alphas_cumprod``, not
    a respaced diffusion's (its indices must be the timesteps the guided callable receives).
    ``sigma_t = sqrt((1 - abar_t) / abar_t)`` is the EDM noise level of VP timestep t (Karras et al. 2022), computed in float64; it increases with t, so the timesteps
    with sigma in ``(sigma_lo, sigma_hi]`` are one contiguous range; ``t_lo`` is -1 when it starts at t = 0. This is
    how the paper's sigma intervals (e.g. (0.28, 5.42] for EDM2 on ImageNet-512, arXiv:2404.07724) carry over to any
    VP schedule. Raises ``ValueError`` if no timestep falls inside.
    """
    lo, hi = _check_interval((sigma_lo, sigma_hi))
    if isinstance(alphas_cumprod, torch.Tensor):
        alphas_cumprod = alphas_cumprod.detach().cpu().double().numpy()
    abar = np.asarray(alphas_cumprod, dtype=np.float64)
    bad = abar.ndim != 1 or len(abar) == 0
    if not bad:
        with np.errstate(divide="ignore", invalid="ignore"):  # abar = 0 gives sigma = inf, still ordered
            sigma = np.sqrt((1.0 - abar) / abar)
        bad = not (np.all((abar >= 0) & (abar <= 1)) and np.all(np.diff(sigma) > 0))
    if bad:
        raise ValueError("alphas_cumprod must be a non-empty 1-D array of strictly decreasing alpha-bars in [0, 1]")
    first_above = int(np.searchsorted(sigma, lo, side="right"))  # first t with sigma_t > lo
    last_within = int(np.searchsorted(sigma, hi, side="right")) - 1  # last t with sigma_t <= hi
    if first_above > last_within:
        raise ValueError(
            f"no timestep has sigma in ({sigma_lo:g}, {sigma_hi:g}]: the schedule's sigma goes from {sigma[0]:.4g} "
            f"to {sigma[-1]:.4g}"
        )
    return first_above - 1, last_within


def guided_fraction(timesteps: Sequence[int] | torch.Tensor, interval: Sequence[float] | None) -> float:
    """Fraction of ``timesteps`` (the model timesteps a sampler visits, one model call each) with ``lo < t <= hi``.

    A guided step costs a 2N-row model call, an unguided one N rows, so a sampler's model compute is
    ``(1 + guided_fraction)`` / 2 of guiding every step. ``interval=None`` -> 1.0.
    """
    bounds = _check_interval(interval)
    ts = timesteps.tolist() if isinstance(timesteps, torch.Tensor) else list(timesteps)
    if not ts:
        raise ValueError("guided_fraction needs at least one timestep")
    if bounds is None:
        return 1.0
    lo, hi = bounds
    return sum(lo < t <= hi for t in ts) / len(ts)


def official_cfg_forward(model: Model, scale: float, guided_channels: int = 3) -> Callable[..., torch.Tensor]:
    """facebookresearch/DiT's ``forward_with_cfg`` as a wrapper: ``guided(x, t, **kwargs)`` on a doubled batch.

    x: (2N, C, ...) whose first half is used for both halves; t: (2N,); kwargs such as ``y`` (2N,) hold the
    conditional values then the null ones. Only the first ``guided_channels`` (3, as the official code, "for exact
    reproducibility") output channels are guided and the guided half is written to both halves; the remaining
    channels of each half are left as the model produced them. Returns (2N, C_out, ...). See the module docstring
    for how to sample with it.
    """
    scale = _check_scale(scale)
    if guided_channels < 1:
        raise ValueError(f"guided_channels must be positive, got {guided_channels}")

    def guided(x: torch.Tensor, t: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if x.shape[0] % 2:
            raise ValueError(f"official_cfg_forward needs a doubled (even) batch, got {x.shape[0]}")
        half = x[: x.shape[0] // 2]
        model_out = model(torch.cat([half, half], dim=0), t, **kwargs)  # (2N, C_out, ...)
        eps, rest = model_out[:, :guided_channels], model_out[:, guided_channels:]
        cond_eps, uncond_eps = torch.split(eps, eps.shape[0] // 2, dim=0)
        half_eps = uncond_eps + scale * (cond_eps - uncond_eps)
        return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)

    return guided
