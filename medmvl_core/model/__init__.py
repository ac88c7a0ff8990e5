"""The MedM-VL model: config, encoders, connectors, the model class and checkpoint loading.

Importing this package imports torch and transformers (the client side never imports it).
"""

from medmvl_core.model.configuration import MedMVLConfig
from medmvl_core.model.connectors import CONNECTORS, build_connector, register_connector
from medmvl_core.model.encoders import ENCODERS, build_encoder, register_encoder
from medmvl_core.model.modeling import (
    IMAGE3D_TOKEN_INDEX,
    IMAGE_TOKEN_INDEX,
    MedMVLForConditionalGeneration,
    MedMVLPreTrainedModel,
)


def load_checkpoint(path, device="cpu", dtype=None, quantize="none", vision_dtype=None):  # noqa: ANN001 - typed in loader
    """Load our format or a MedM-VL folder (HEAD or v1.0 schema), offline; returns
    ``(model, processor)``. See :func:`medmvl_core.model.loader.load_checkpoint`."""
    from medmvl_core.model.loader import load_checkpoint as _load

    return _load(path, device=device, dtype=dtype, quantize=quantize, vision_dtype=vision_dtype)


__all__ = [
    "CONNECTORS",
    "ENCODERS",
    "IMAGE3D_TOKEN_INDEX",
    "IMAGE_TOKEN_INDEX",
    "MedMVLConfig",
    "MedMVLForConditionalGeneration",
    "MedMVLPreTrainedModel",
    "build_connector",
    "build_encoder",
    "load_checkpoint",
    "register_connector",
    "register_encoder",
]
