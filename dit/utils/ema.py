"""Exponential moving average of model weights, kept in fp32 whatever precision the model trains in."""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_decay_at(decay: float, num_updates: int, warmup: bool = True) -> float:
    """Decay used for update number ``num_updates`` (0-based): ``min(decay, (1 + k) / (10 + k))`` with warm-up.

    The warm-up (as in TensorFlow's ExponentialMovingAverage with ``num_updates``) makes early averages follow the
    model instead of the initial weights; it reaches 0.999 after ~9,000 updates and 0.9999 after ~90,000.
    """
    return min(decay, (1.0 + num_updates) / (10.0 + num_updates)) if warmup else decay


class EMA:
    """fp32 shadow copy of a model: ``ema = decay * ema + (1 - decay) * model`` after every optimizer step.

    The shadow is a frozen deep copy (same class, so it can be called for sampling and its ``state_dict`` loads into
    a fresh ``create_model`` instance). Buffers are copied, not averaged.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).float().eval().requires_grad_(False)
        self._params = [p for p in self.module.parameters()]

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None) -> None:
        """Move the shadow towards ``model`` (unwrapped, same architecture). ``decay=0`` copies the weights."""
        d = self.decay if decay is None else decay
        src = [p.detach() for p in model.parameters()]
        if len(src) != len(self._params):
            raise ValueError(f"EMA.update: model has {len(src)} parameters, the EMA copy has {len(self._params)}")
        if any(s.dtype != torch.float32 for s in src):
            src = [s.float() for s in src]
        # lerp(ema, p, w) = ema + w (p - ema) = decay * ema + (1 - decay) * p with w = 1 - decay; one fused kernel
        torch._foreach_lerp_(self._params, src, 1.0 - d)
        for b_ema, b in zip(self.module.buffers(), model.buffers()):
            b_ema.copy_(b)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)

    def to(self, device: torch.device | str) -> "EMA":
        self.module.to(device)
        return self
