"""Model registry: the paper's names (``DiT-S/2`` ... ``DiT-XL/8``, ``UNet-S`` ...) -> constructors (timm style)."""

from __future__ import annotations

import difflib
import fnmatch
from typing import Callable

from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str, **defaults) -> None:
    """Register ``name`` as a constructor call with fixed keyword ``defaults``.

    The constructor is the first positional entry ``defaults.pop("cls")``; overrides given to ``create_model`` win.
    """
    cls = defaults.pop("cls")
    if name in _REGISTRY:
        raise ValueError(f"model name {name!r} is registered twice")

    def factory(**overrides):
        return cls(**{**defaults, **overrides})

    factory.defaults = dict(defaults)  # type: ignore[attr-defined]
    factory.cls = cls  # type: ignore[attr-defined]
    _REGISTRY[name] = factory


def list_models(pattern: str | None = None) -> list[str]:
    """Registered model names, optionally filtered by a shell pattern such as ``"DiT-*"``."""
    names = sorted(_REGISTRY)
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def model_defaults(name: str) -> dict:
    """The keyword arguments ``create_model(name)`` passes to the model class."""
    _check_name(name)
    return dict(_REGISTRY[name].defaults)  # type: ignore[attr-defined]


def _check_name(name: str) -> None:
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown model {name!r}.{hint} Valid names: {', '.join(list_models())}")


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered model, e.g. ``create_model("DiT-XL/2", input_size=32, num_classes=1000)``.

    Unknown names raise ``ValueError`` listing the valid ones; unknown overrides raise ``TypeError`` from the model.
    """
    _check_name(name)
    factory = _REGISTRY[name]
    try:
        return factory(**overrides)
    except TypeError as e:  # an override the model does not take: say which model and what it accepts
        import inspect

        params = [p for p in inspect.signature(factory.cls.__init__).parameters if p != "self"]  # type: ignore
        raise TypeError(f"create_model({name!r}): {e}. Accepted keyword arguments: {', '.join(params)}") from None
