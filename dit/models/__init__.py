"""Model zoo: DiT (``dit.py``), the ADM-style UNet baseline (``unet.py``), shared blocks (``layers.py``)."""

from .registry import create_model, list_models, model_defaults, register_model

# Importing the model modules registers their names.
from . import dit as _dit  # noqa: F401,E402
from . import unet as _unet  # noqa: F401,E402

__all__ = ["create_model", "list_models", "model_defaults", "register_model"]
