"""Timestep respacing: sample (or train) with a subset of the original steps (Nichol & Dhariwal 2021, Sec. 4).

Keeping steps S = {s_0 < s_1 < ...} of the original schedule and setting ``beta'_i = 1 - abar_{s_i} / abar_{s_{i-1}}``
gives a shorter chain whose alpha-bars equal the original ones at the kept steps, so a model trained on the full chain
can be used unchanged; it is called with the original timestep indices ``timestep_map[i] = s_i``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .gaussian import GaussianDiffusion, Model


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> set[int]:
    """Which original steps to keep, with ADM's semantics.

    ``section_counts`` is a comma string or list of counts: the T steps are cut into len(counts) near-equal sections
    and each section keeps that many evenly spaced steps (``"250"``: 250 steps over the whole range;
    ``"10,15,20"``: 10 in the first third, ...). ``"ddimN"`` keeps ``range(0, T, stride)`` for the integer stride
    that gives exactly N steps (the DDIM paper's striding).
    """
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec.startswith("ddim"):
            try:
                desired_count = int(spec[len("ddim") :])
            except ValueError:
                raise ValueError(f"timestep respacing {section_counts!r}: expected 'ddimN' with an integer N") from None
            for stride in range(1, num_timesteps + 1):
                if len(range(0, num_timesteps, stride)) == desired_count:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(
                f"timestep respacing {section_counts!r}: no integer stride gives exactly {desired_count} of "
                f"{num_timesteps} steps; use a plain count such as '{desired_count}'"
            )
        try:
            section_counts = [int(x) for x in spec.split(",")]
        except ValueError:
            raise ValueError(
                f"timestep respacing {section_counts!r}: expected 'N', 'N1,N2,...' or 'ddimN' "
                "(create_diffusion takes '' for all steps)"
            ) from None
    counts = list(section_counts)
    if not counts or not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) and c >= 0 for c in counts):
        raise ValueError(f"timestep respacing {section_counts!r}: section counts must be non-negative integers")
    size_per = num_timesteps // len(counts)
    extra = num_timesteps % len(counts)
    start_idx = 0
    all_steps: list[int] = []
    for i, section_count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(
                f"timestep respacing {section_counts!r}: cannot take {section_count} steps from a section of "
                f"{size} (of {num_timesteps} steps in total)"
            )
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        for _ in range(section_count):
            # Python's round (half to even), as ADM, so the kept steps are identical.
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    if not all_steps:
        raise ValueError(f"timestep respacing {section_counts!r} keeps no steps")
    return set(all_steps)


class _WrappedModel:
    """Calls ``model`` with original timesteps: respaced index i -> ``timestep_map[i]`` (same dtype and device)."""

    def __init__(self, model: Model, timestep_map: list[int], map_tensors: dict | None = None):
        self.model = model
        self.timestep_map = timestep_map
        # One host-to-device copy per device/dtype (shared by the diffusion's wrappers), not one per call: a fresh
        # copy from host memory every model call stalls the host until the GPU queue drains (a hidden sync).
        self._map_tensors: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {} if map_tensors is None else map_tensors

    def __call__(self, x: torch.Tensor, ts: torch.Tensor, **kwargs) -> torch.Tensor:
        key = (ts.device, ts.dtype)
        map_tensor = self._map_tensors.get(key)
        if map_tensor is None:
            map_tensor = self._map_tensors[key] = torch.tensor(self.timestep_map, device=ts.device, dtype=ts.dtype)
        return self.model(x, map_tensor[ts], **kwargs)

    def parameters(self):
        """Delegates to the wrapped model (used to find the sampling device)."""
        params = getattr(self.model, "parameters", None)
        return params() if callable(params) else iter(())


class SpacedDiffusion(GaussianDiffusion):
    """A ``GaussianDiffusion`` over the kept steps ``use_timesteps`` of a base schedule ``betas``.

    ``base_kwargs`` are ``GaussianDiffusion``'s (``betas`` = the original schedule, prediction, learn_sigma, loss,
    sigma_small). Attributes: ``timestep_map`` (list, respaced index -> original index), ``original_num_steps``,
    ``base_betas`` (the original schedule, float64).
    """

    def __init__(self, use_timesteps: Sequence[int] | set[int], **base_kwargs):
        if "betas" not in base_kwargs:
            raise ValueError("SpacedDiffusion needs betas= (the original, un-respaced schedule)")
        base = GaussianDiffusion(**base_kwargs)
        self.use_timesteps = set(int(t) for t in use_timesteps)
        bad = sorted(t for t in self.use_timesteps if not 0 <= t < base.num_timesteps)
        if bad or not self.use_timesteps:
            raise ValueError(
                f"use_timesteps must be a non-empty subset of 0..{base.num_timesteps - 1}; bad values: {bad[:5]}"
            )
        self.original_num_steps = base.num_timesteps
        self.base_betas = base.betas
        self.timestep_map: list[int] = []
        new_betas = []
        last_alpha_cumprod = 1.0
        for i, alpha_cumprod in enumerate(base.alphas_cumprod):
            if i in self.use_timesteps:
                new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                self.timestep_map.append(i)
        super().__init__(**{**base_kwargs, "betas": np.array(new_betas, dtype=np.float64)})
        self._identity_map = self.timestep_map == list(range(self.original_num_steps))
        self._map_tensors: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def _wrap_model(self, model: Model) -> Model:
        if isinstance(model, _WrappedModel) or self._identity_map:
            # All steps kept (training): indices are already original timesteps; no mapping, no extra kernels.
            return model
        return _WrappedModel(model, self.timestep_map, self._map_tensors)
