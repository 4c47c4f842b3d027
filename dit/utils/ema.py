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


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of an FSDP parameter (a DTensor; the shard is a view, so in-place ops change the
    parameter), or a plain tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def shard_pairs(ema_module: nn.Module, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(EMA parameters, detached model parameters) as plain tensors, in order. Under FSDP (``dit.fsdp``) both are
    sharded the same way, so the update works on the local shards element for element, without collectives."""
    dst = [local_shard(p) for p in ema_module.parameters()]
    src = [local_shard(p.detach()) for p in model.parameters()]
    if len(src) != len(dst):
        raise ValueError(f"EMA update: model has {len(src)} parameters, the EMA copy has {len(dst)}")
    for a, b in zip(dst, src):
        if a.shape != b.shape:
            raise ValueError(f"EMA update: shard shapes differ ({tuple(a.shape)} vs {tuple(b.shape)}): the model and "
                             f"its EMA copy must be sharded the same way")
    return dst, src


def buffer_pairs(ema_module: nn.Module, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(EMA buffer, model buffer) pairs matched by name: buffers only the trained model has (DiT.set_compute_weights'
    copies) are left out. Look them up once where the buffers are final: walking the modules costs host time."""
    ema_buffers = dict(ema_module.named_buffers())
    return [(ema_buffers[name], b) for name, b in model.named_buffers() if name in ema_buffers]


@torch.no_grad()
def copy_buffers(ema_module: nn.Module, model: nn.Module,
                 pairs: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
    """Buffers (none in DiT; statistics in other models) are copied into the EMA model, not averaged (``pairs``:
    ``buffer_pairs`` looked up before)."""
    for b_ema, b in pairs if pairs is not None else buffer_pairs(ema_module, model):
        b_ema.copy_(b)


class EMA:
    """fp32 shadow copy of a model: ``ema = decay * ema + (1 - decay) * model`` after every optimizer step.

    The shadow is a frozen deep copy (same class, so it can be called for sampling and its ``state_dict`` loads into
    a fresh ``create_model`` instance). Buffers are copied, not averaged. Parameters are looked up at every update,
    not cached: sharding the copy with FSDP (``dit.fsdp.shard_model``) replaces them with new DTensor parameters.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.module = copy.deepcopy(model).float().eval().requires_grad_(False)
        if hasattr(self.module, "set_compute_weights"):  # the training copies of the weights: not the EMA's
            self.module.set_compute_weights(None)

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None) -> None:
        """Move the shadow towards ``model`` (unwrapped, same architecture). ``decay=0`` copies the weights."""
        d = self.decay if decay is None else decay
        dst, src = shard_pairs(self.module, model)
        if any(s.dtype != torch.float32 for s in src):
            src = [s.float() for s in src]
        # lerp(ema, p, w) = ema + w (p - ema) = decay * ema + (1 - decay) * p with w = 1 - decay; one fused kernel
        torch._foreach_lerp_(dst, src, 1.0 - d)
        copy_buffers(self.module, model)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state)

    def to(self, device: torch.device | str) -> "EMA":
        self.module.to(device)
        return self
