"""Small shared utilities: weight EMA (``ema.py``) and forward FLOP counting (``flops.py``)."""

from .ema import EMA
from .flops import forward_flops

__all__ = ["EMA", "forward_flops"]
