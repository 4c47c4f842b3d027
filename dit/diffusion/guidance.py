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
"""

from __future__ import annotations

from typing import Any, Callable

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


def classifier_free_guidance(
    model: Model,
    scale: float,
    uncond_kwargs: dict[str, Any],
    pred_channels: int | None = None,
) -> Callable[..., torch.Tensor]:
    """Wrap ``model`` into ``guided(x, t, **cond_kwargs)`` returning the guided output (N, C_out, ...).

    One model call on ``cat([x, x])`` (2N, C, ...) with ``cond_kwargs`` then ``uncond_kwargs`` concatenated along
    dim 0 (e.g. ``uncond_kwargs={"y": torch.full((N,), num_classes)}``). The first ``pred_channels`` output channels
    (default: ``x.shape[1]``, i.e. the prediction part whether or not the model learns sigma) become
    ``u + scale * (c - u)``; the remaining channels (learned variance values) come from the conditional branch.
    ``scale = 1`` is the conditional model, ``scale = 0`` the unconditional one.
    """
    scale = _check_scale(scale)
    if pred_channels is not None and pred_channels < 1:
        raise ValueError(f"pred_channels must be a positive channel count, got {pred_channels}")

    def guided(x: torch.Tensor, t: torch.Tensor, **cond_kwargs: Any) -> torch.Tensor:
        n = x.shape[0]
        kwargs = _double_kwargs(cond_kwargs, uncond_kwargs, n)
        out = model(torch.cat([x, x], dim=0), torch.cat([t, t], dim=0), **kwargs)  # (2N, C_out, ...)
        cond, uncond = out[:n], out[n:]
        k = x.shape[1] if pred_channels is None else pred_channels
        if k > out.shape[1]:
            raise ValueError(f"pred_channels={k} exceeds the model's {out.shape[1]} output channels")
        guided_pred = uncond[:, :k] + scale * (cond[:, :k] - uncond[:, :k])  # (N, k, ...)
        return torch.cat([guided_pred, cond[:, k:]], dim=1)

    return guided


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
