"""Vision encoders in an explicit registry: ``clip``, ``siglip`` (2D) and ``m3dclip``, ``medmclip`` (3D),
plus ``convvit3d`` (a small conv-stem 3D ViT for models trained here, e.g. the demo model).

Every encoder wraps its network as ``self.encoder`` so state-dict keys match MedM-VL's
(``encoder_image.encoder.vision_model.*``, ``encoder_image3d.encoder.vision_encoder.*``), and
implements MedM-VL's feature selection: ``hidden_states[select_layer]``, then ``patch`` drops the
first token and ``cls_patch`` keeps all tokens (for SigLIP, which has no CLS token, ``patch``
drops the first patch — as MedM-VL does).
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import torch
from torch import nn

from medmvl_core.errors import ConfigError, RegistryError
from medmvl_core.model.convvit3d import ConvViT3D
from medmvl_core.model.vit3d import M3DViT, MedMViT

logger = logging.getLogger(__name__)


def select_features(hidden_states: list[torch.Tensor] | tuple, select_layer: int, select_feature: str) -> torch.Tensor:
    """Pick ``hidden_states[select_layer]`` [B, T, C] and drop the first token for ``patch``."""
    features = hidden_states[select_layer]
    if select_feature == "patch":
        return features[:, 1:]
    if select_feature == "cls_patch":
        return features
    raise ConfigError(f"select_feature = {select_feature!r} is not supported; use 'patch' or 'cls_patch'")


class VisionEncoder(nn.Module):
    """Base: ``forward(x, select_layer, select_feature) -> [B, T, C]``."""

    is_3d = False
    has_cls = False

    def __init__(self, spec: dict) -> None:
        super().__init__()
        self.spec = spec

    @property
    def hidden_size(self) -> int:
        raise NotImplementedError

    def num_patches(self) -> int:
        raise NotImplementedError

    def patch_grid(self) -> list[int]:
        """Patch counts per spatial axis ([D, H, W] for 3D, [H, W] for 2D)."""
        raise NotImplementedError

    def num_tokens(self, select_feature: str) -> int:
        """Number of feature rows per input for this feature selection."""
        n = self.num_patches() + (1 if self.has_cls else 0)
        return n - 1 if select_feature == "patch" else n


class _HFVisionEncoder(VisionEncoder):
    config_cls_name = ""
    model_cls_name = ""

    def __init__(self, spec: dict) -> None:
        super().__init__(spec)
        import transformers

        cfg = dict(spec["config"])
        if "vision_config" in cfg:  # a full CLIP/SigLIP config: keep the vision tower's
            cfg = dict(cfg["vision_config"])
        cfg.pop("model_type", None)
        config = getattr(transformers, self.config_cls_name)(**cfg)
        config._attn_implementation = spec.get("attn_implementation", "eager")
        self.encoder = getattr(transformers, self.model_cls_name)(config)
        self.vision_config = config

    @property
    def hidden_size(self) -> int:
        return self.vision_config.hidden_size

    def patch_grid(self) -> list[int]:
        n = self.vision_config.image_size // self.vision_config.patch_size
        return [n, n]

    def num_patches(self) -> int:
        return math.prod(self.patch_grid())

    def forward(self, x: torch.Tensor, select_layer: int, select_feature: str) -> torch.Tensor:
        """x: [B, 3, H, W] -> [B, T, C]."""
        out = self.encoder(x.to(self.encoder.dtype), output_hidden_states=True)
        return select_features(out.hidden_states, select_layer, select_feature)


class SiglipEncoder(_HFVisionEncoder):
    config_cls_name = "SiglipVisionConfig"
    model_cls_name = "SiglipVisionModel"


class ClipEncoder(_HFVisionEncoder):
    config_cls_name = "CLIPVisionConfig"
    model_cls_name = "CLIPVisionModel"
    has_cls = True


class M3DClipEncoder(VisionEncoder):
    """M3D-CLIP's 3D ViT (MONAI ViT layout); text tower not built (only the vision side is used)."""

    is_3d = True
    has_cls = True

    def __init__(self, spec: dict) -> None:
        super().__init__(spec)
        self.encoder = nn.Module()
        self.encoder.vision_encoder = M3DViT.from_config(spec["config"])

    @property
    def hidden_size(self) -> int:
        return self.encoder.vision_encoder.hidden_size

    def patch_grid(self) -> list[int]:
        return list(self.encoder.vision_encoder.grid)

    def num_patches(self) -> int:
        return math.prod(self.patch_grid())

    def forward(self, x: torch.Tensor, select_layer: int, select_feature: str) -> torch.Tensor:
        """x: [B, C, D, H, W] -> [B, T, C']."""
        enc = self.encoder.vision_encoder
        _, hidden_states = enc(x.to(enc.cls_token.dtype))
        return select_features(hidden_states, select_layer, select_feature)


class MedMClipEncoder(M3DClipEncoder):
    """MedM-CLIP-CT's 3D ViT (vit-pytorch layout with ``nn.TransformerEncoderLayer``)."""

    def __init__(self, spec: dict) -> None:
        VisionEncoder.__init__(self, spec)
        self.encoder = nn.Module()
        self.encoder.vision_encoder = MedMViT.from_config(spec["config"])


class ConvViT3DEncoder(M3DClipEncoder):
    """The conv-stem 3D ViT of :mod:`medmvl_core.model.convvit3d` (same key layout as ``m3dclip``)."""

    def __init__(self, spec: dict) -> None:
        VisionEncoder.__init__(self, spec)
        self.encoder = nn.Module()
        self.encoder.vision_encoder = ConvViT3D.from_config(spec["config"])

    @property
    def hidden_size(self) -> int:
        """The width of the tokens it gives the connector (``coord_features`` / ``label_features`` widen the
        last layer's)."""
        return self.encoder.vision_encoder.output_size

    def num_tokens(self, select_feature: str) -> int:
        """The patch tokens (and the summary token), then the ``detections`` tokens (``num_detections``)."""
        return super().num_tokens(select_feature) + self.encoder.vision_encoder.num_detections

    def forward(self, x: torch.Tensor, select_layer: int, select_feature: str) -> torch.Tensor:
        enc = self.encoder.vision_encoder
        if (enc.num_detections or enc.output_size != enc.hidden_size) and select_layer not in (-1, len(enc.blocks) - 1):
            raise ConfigError(f"a convvit3d encoder with detections, coord_features or label_features gives those at "
                              f"the last layer only; set select_layer to -1 (got {select_layer})")
        _, hidden_states, _ = enc(x.to(enc.cls_token.dtype))
        return select_features(hidden_states, select_layer, select_feature)


EncoderBuilder = Callable[[dict], VisionEncoder]
ENCODERS: dict[str, EncoderBuilder] = {}


def register_encoder(name: str, builder: EncoderBuilder) -> None:
    """Add an encoder type; registering a name twice raises."""
    if name in ENCODERS:
        raise RegistryError(f"encoder {name!r} is already registered; pick another name")
    ENCODERS[name] = builder


def build_encoder(spec: dict) -> VisionEncoder:
    """Build the encoder named by ``spec['type']``; unknown names raise ``RegistryError``."""
    name = spec.get("type")
    if name not in ENCODERS:
        raise RegistryError(f"unknown encoder type {name!r}; valid types: {sorted(ENCODERS)}")
    return ENCODERS[name](spec)


for _name, _cls in (("clip", ClipEncoder), ("siglip", SiglipEncoder),
                    ("m3dclip", M3DClipEncoder), ("medmclip", MedMClipEncoder),
                    ("convvit3d", ConvViT3DEncoder)):
    register_encoder(_name, _cls)
