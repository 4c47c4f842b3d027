"""Forward-pass FLOPs of any zoo model, measured with ``torch.utils.flop_counter`` on meta tensors (no compute).

Convention: torch's counter counts **2 FLOPs per multiply-add** (a (m, k) @ (k, n) matmul is ``2 m k n``), so its
numbers are twice the "Gflops" of the DiT paper (Peebles & Xie 2023, Table 1), which count multiply-adds. Only
matmuls, convolutions and attention are counted (norms, activations and additions are not), as in the paper.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["forward_flops"]


def forward_flops(model: nn.Module, batch_size: int = 1, context_len: int = 32) -> int:
    """FLOPs (2 per multiply-add) of one forward pass of ``model`` on a batch of ``batch_size`` inputs.

    Inputs are built from the zoo attributes (``in_channels``, ``input_size``, ``conditioning``, ``context_dim``):
    x (B, in_channels, input_size, input_size), t (B,), y (B,) for class models, context (B, context_len,
    context_dim) with an all-true mask for text models. They live on the model's device, so a model built under
    ``with torch.device("meta"):`` is counted without allocating or computing anything.
    """
    if batch_size <= 0:
        raise ValueError(f"forward_flops: batch_size must be positive, got {batch_size}")
    for attr in ("in_channels", "input_size", "conditioning"):
        if not hasattr(model, attr):
            raise ValueError(f"forward_flops: model {type(model).__name__} lacks the zoo attribute {attr!r}")
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    b, s = batch_size, model.input_size
    kwargs: dict[str, torch.Tensor] = {}
    if model.conditioning == "class":
        kwargs["y"] = torch.zeros(b, dtype=torch.long, device=device)
    elif model.conditioning == "text":
        kwargs["context"] = torch.zeros(b, context_len, model.context_dim, dtype=dtype, device=device)
        kwargs["context_mask"] = torch.ones(b, context_len, dtype=torch.bool, device=device)
    x = torch.zeros(b, model.in_channels, s, s, dtype=dtype, device=device)
    t = torch.zeros(b, dtype=torch.long, device=device)
    was_training = model.training
    model.eval()  # no label dropout (random numbers) while counting
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x, t, **kwargs)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())
