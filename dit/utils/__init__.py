"""Small shared utilities: weight EMA (``ema.py``), forward FLOP counting (``flops.py``), the autocast dtypes."""

import torch

from .ema import EMA
from .flops import forward_flops

# Mixed-precision names (train.mixed_precision, tools/sample.py --precision, tools/benchmark.py --amp-dtype) -> the
# autocast dtype. fp16 keeps 3 more mantissa bits than bf16 and needs a loss scale in training (docs/benchmarks.md,
# run 24).
AUTOCAST_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}

__all__ = ["AUTOCAST_DTYPES", "EMA", "forward_flops"]
