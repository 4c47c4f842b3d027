"""``load_autoencoder(spec)``: one entry point for every backend.

Specs: ``"identity"``, ``"taef2:<dir>"``, ``"taesd:<hub id or dir>"``, ``"kl:<hub id, dir or file>"``, or a bare
hub id / dir / file (-> KL). Normalisation precedence: explicit ``scale``/``shift`` > ``norm_file`` > a
``latent_norm.json`` next to local weights > the backend's default (KL/TAESD: the diffusers config; TAEF2 and
identity: scale 1, no shift).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Sequence

import torch

from .base import Autoencoder
from .constants import NORM_FILENAME
from .diffusers_backends import KLAutoencoder, TinyAutoencoder
from .identity import IdentityAutoencoder
from .taef2 import TAEF2

BACKENDS = ("identity", "taef2", "taesd", "kl")
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}  # fmt: skip


def parse_spec(spec: str) -> tuple[str, str]:
    """``"kind:target"`` -> ``(kind, target)``; a bare target means ``kl``; ``"identity"`` -> ``("identity", "")``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"autoencoder spec: expected a non-empty string such as 'taef2:<dir>', got {spec!r}")
    spec = spec.strip()
    if spec == "identity":
        return "identity", ""
    kind, sep, target = spec.partition(":")
    # a one-letter "prefix" is a Windows drive, not a backend
    if not sep or len(kind) == 1 or "/" in kind:
        return "kl", spec
    if kind not in BACKENDS:
        raise ValueError(f"autoencoder spec {spec!r}: unknown backend {kind!r}, expected one of {', '.join(BACKENDS)}")
    if kind == "identity":
        raise ValueError(f"autoencoder spec {spec!r}: 'identity' takes no argument")
    if not target:
        raise ValueError(f"autoencoder spec {spec!r}: expected '{kind}:<path or hub id>'")
    return kind, target


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``None``, a torch dtype or one of 'float32'/'fp32'/'bfloat16'/'bf16'/'float16'/'fp16' -> torch dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"dtype: expected one of {sorted(_DTYPES)} or a torch.dtype, got {dtype!r}")


def read_norm_file(path: str | Path) -> tuple[float | list[float], list[float] | float | None]:
    """Read ``{"scale": float | [C], "shift": null | float | [C]}`` (as written by ``tools/measure_vae.py``)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"latent normalisation file not found: {p} (expected JSON with 'scale' and 'shift')")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(data, dict) or "scale" not in data:
        raise ValueError(f"{p}: expected a JSON object with a 'scale' (and optional 'shift') entry")
    return data["scale"], data.get("shift")


def _local_weights_dir(kind: str, target: str) -> Path | None:
    if kind == "identity":
        return None
    p = Path(target).expanduser()
    if p.is_dir():
        return p
    if p.is_file():
        return p.parent
    return None


def load_autoencoder(
    spec: str,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    scale: float | Sequence[float] | torch.Tensor | None = None,
    shift: float | Sequence[float] | torch.Tensor | None = None,
    norm_file: str | Path | None = None,
    batch_size: int = 32,
    sample_posterior: bool = False,
    config: str | None = None,
) -> Autoencoder:
    """Build a frozen, eval-mode autoencoder from ``spec`` (see module docstring).

    Args:
        device: where the weights live (default CPU). On CUDA the weights are put in channels_last.
        dtype: autocast dtype on CUDA ('bf16'/'fp16' or a torch dtype); weights stay float32.
        scale, shift: normalisation ``(raw - shift) * scale``, overriding files and backend defaults.
        norm_file: JSON with ``scale``/``shift`` (default: ``latent_norm.json`` beside local weights, if present).
        batch_size: default images per forward pass.
        sample_posterior: KL only: sample the posterior instead of taking its mean.
        config: KL single-file only: diffusers config folder or hub id for ``from_single_file``.
    """
    kind, target = parse_spec(spec)
    autocast_dtype = parse_dtype(dtype)
    if scale is None and shift is None:
        weights_dir = _local_weights_dir(kind, target)
        if norm_file is None and weights_dir is not None and (weights_dir / NORM_FILENAME).is_file():
            norm_file = weights_dir / NORM_FILENAME
        if norm_file is not None:
            scale, shift = read_norm_file(norm_file)
    elif norm_file is not None:
        raise ValueError("pass either scale/shift or norm_file, not both")
    if config is not None and kind != "kl":
        raise ValueError(f"config= is only used by single-file KL autoencoders, not {kind!r}")
    common = dict(spec=spec, dtype=autocast_dtype, batch_size=batch_size, sample_posterior=sample_posterior)

    if kind == "identity":
        ae: Autoencoder = IdentityAutoencoder(scale=scale, shift=shift, **common)
    elif kind == "taef2":
        ae = TAEF2.from_dir(target, scale=1.0 if scale is None else scale, shift=shift, **common)
        if scale is None and shift is None:
            warnings.warn(
                f"{spec}: no latent normalisation given (scale=1, no shift); TAEF2 latents are not unit-scale, "
                f"measure them with tools/measure_vae.py and pass scale/shift or put {NORM_FILENAME} beside the "
                "weights",
                stacklevel=2,
            )
    elif kind == "taesd":
        ae = TinyAutoencoder.load(target, scale=scale, shift=shift, **common)
    else:
        ae = KLAutoencoder.load(target, config=config, scale=scale, shift=shift, **common)

    if device is not None:
        device = torch.device(device)
        ae = ae.to(device)
        if device.type == "cuda":
            ae = ae.to(memory_format=torch.channels_last)
    return ae
