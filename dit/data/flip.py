"""Deterministic per-item randomness for datasets: a hash of (seed, epoch, index), never a global RNG.

Datasets decide "flip item i in epoch e?" by hashing, so a resumed run (or any DataLoader worker layout) sees
exactly the same augmentation as an uninterrupted one.
"""

from __future__ import annotations

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    """One step of the SplitMix64 finaliser (Steele et al., 2014): a bijective 64-bit mixer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def hash_unit(*keys: int) -> float:
    """Integers -> a uniform float in [0, 1) that depends on every key and on their order."""
    h = 0
    for k in keys:
        h = _splitmix64(h ^ (int(k) & _MASK64))
    return (h >> 11) / float(1 << 53)  # top 53 bits -> exact double in [0, 1)


def flip_decision(seed: int, epoch: int, index: int) -> bool:
    """Whether item ``index`` is horizontally flipped in ``epoch`` (probability 1/2, deterministic)."""
    return hash_unit(seed, epoch, index) < 0.5
