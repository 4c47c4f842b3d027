"""Model zoo: DiT (``dit.py``), the ADM-style UNet baseline (``unet.py``), shared blocks (``layers.py``)."""

from .registry import create_model, list_models, model_defaults, register_model

# Importing the model modules registers their names.
from . import dit as _dit  # noqa: F401,E402

try:  # the UNet lands in its own module; the zoo works without it while it is being written
    from . import unet as _unet  # noqa: F401
except ImportError:  # pragma: no cover
    pass

__all__ = ["create_model", "list_models", "model_defaults", "register_model"]
