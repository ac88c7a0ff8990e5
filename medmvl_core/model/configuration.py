"""``MedMVLConfig``: one composite config with every sub-config nested, validated on construction.

The LLM config is a real transformers config (built with ``AutoConfig.for_model``); the encoder
and connector specs are plain JSON dicts checked against the registries in
:mod:`medmvl_core.model.encoders` and :mod:`medmvl_core.model.connectors`.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from transformers import AutoConfig, PretrainedConfig

from medmvl_core.errors import ConfigError

SUPPORTED_LLM_TYPES = ("qwen2", "llama", "phi", "phi3")
SELECT_FEATURES = ("patch", "cls_patch")
PADDING_SIDES = ("left", "right")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")
# How a 3D volume goes through a 2D encoder when there is no 3D encoder (MedM-VL-CT-Chest):
#   "concat": slices encoded as a batch, all slice tokens concatenated, then the connector
#             (MedM-VL HEAD 225fc0f and v1.0 5a90f80: what the released CT-Chest model runs);
#   "mean":   each slice through encoder and connector, outputs averaged over slices (an
#             intermediate MedM-VL commit; kept for checkpoints trained with it).
SLICE_FUSIONS = ("concat", "mean")
_MLP_NAME = re.compile(r"^mlp(\d+)x_gelu$")


def _check_choice(what: str, value: Any, allowed: tuple | list) -> None:
    if value not in allowed:
        raise ConfigError(f"{what} = {value!r} is not supported; use one of {list(allowed)}")


def _copy_spec(spec: Any, where: str, registry: dict) -> dict:
    """A deep copy of ``spec``, checked to be a dict whose ``type`` is a name in ``registry``."""
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must be a dict or None, got {type(spec).__name__}")
    spec = copy.deepcopy(spec)
    _check_choice(f"{where}.type", spec.get("type"), sorted(registry))
    return spec


def validate_encoder_spec(spec: dict | None, where: str) -> dict | None:
    """Check an encoder spec dict (``type``, ``select_layer``, ``select_feature``, ``config``)."""
    if spec is None:
        return None
    from medmvl_core.model.encoders import ENCODERS

    spec = _copy_spec(spec, where, ENCODERS)
    spec.setdefault("select_layer", -1)
    spec.setdefault("select_feature", "patch")
    if not isinstance(spec["select_layer"], int):
        raise ConfigError(f"{where}.select_layer = {spec['select_layer']!r} must be an int (e.g. -1, -2)")
    _check_choice(f"{where}.select_feature", spec["select_feature"], SELECT_FEATURES)
    if not isinstance(spec.get("config"), dict):
        raise ConfigError(f"{where}.config must be the encoder's config dict (got {spec.get('config')!r})")
    spec.setdefault("attn_implementation", "eager")
    _check_choice(f"{where}.attn_implementation", spec["attn_implementation"], ATTN_IMPLEMENTATIONS)
    return spec


def validate_connector_spec(spec: dict | None, where: str) -> dict | None:
    """Check a connector spec dict (``type``, ``name`` = ``mlpNx_gelu``, extras per type)."""
    if spec is None:
        return None
    from medmvl_core.model.connectors import CONNECTORS

    spec = _copy_spec(spec, where, CONNECTORS)
    spec.setdefault("name", "mlp2x_gelu")
    if not isinstance(spec["name"], str) or not _MLP_NAME.match(spec["name"]):
        raise ConfigError(
            f"{where}.name = {spec['name']!r} is not supported; use 'mlpNx_gelu' with N >= 1 (e.g. 'mlp2x_gelu')"
        )
    if int(_MLP_NAME.match(spec["name"]).group(1)) < 1:
        raise ConfigError(f"{where}.name = {spec['name']!r}: the MLP depth must be at least 1")
    if spec["type"] == "attn_pooling":
        if spec.get("num_queries") is not None and int(spec["num_queries"]) < 1:
            raise ConfigError(f"{where}.num_queries = {spec['num_queries']!r} must be a positive int")
        spec.setdefault("num_heads", 8)
    if spec["type"] == "spatial_pooling":
        spec.setdefault("pool_size", 2)
    from medmvl_core.model.connectors import OUTPUT_NORMS

    _check_choice(f"{where}.output_norm", spec.get("output_norm"), OUTPUT_NORMS)
    if "output_scale" in spec:
        if spec.get("output_norm") is None:
            raise ConfigError(f"{where}.output_scale needs output_norm (e.g. 'layernorm'); set both or neither")
        scale = spec["output_scale"]
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ConfigError(f"{where}.output_scale = {scale!r} must be a positive number (e.g. 0.07)")
    return spec


class MedMVLConfig(PretrainedConfig):
    """Composite config of a MedM-VL model.

    Args:
        llm_config: the LLM's transformers config (dict with ``model_type`` or a config object);
            ``model_type`` one of ``SUPPORTED_LLM_TYPES``.
        encoder_image / encoder_image3d: encoder specs ``{"type", "select_layer", "select_feature",
            "config": {...}, "attn_implementation"}`` or None.
        connector_image / connector_image3d: connector specs ``{"type", "name", ...}`` or None
            (required when the matching encoder is set).
        template: chat template name (see ``medmvl_core.processing``).
        preprocessing: ``{"image": spec, "image3d": spec}`` (see docs/INTERNALS.md).
        padding_side / max_length: the processor's padding side and maximum sequence length
            (after placeholder expansion; stored as ``model_max_length``).
        llm_attn_implementation: attention used in the LLM (MedM-VL HEAD runs ``sdpa``).
        image3d_slice_fusion: ``"concat"`` or ``"mean"``; see ``SLICE_FUSIONS``.
        source: where the checkpoint came from (informational: format, hub ids of the bases).
        box_refs: finding labels (a ``convvit3d`` encoder's ``dense_tokens`` labels, in its order) whose
            boxes the LLM writes as one reference token each, decoded to the encoder's box head's box
            (see :mod:`medmvl_core.model.box_refs`); None (the default, and every MedM-VL checkpoint):
            boxes are plain text.
    """

    model_type = "medmvl"
    sub_configs = {"llm_config": AutoConfig}
    has_no_defaults_at_init = True

    def __init__(
        self,
        llm_config: dict | PretrainedConfig | None = None,
        encoder_image: dict | None = None,
        encoder_image3d: dict | None = None,
        connector_image: dict | None = None,
        connector_image3d: dict | None = None,
        template: str = "qwen2",
        preprocessing: dict | None = None,
        padding_side: str = "right",
        max_length: int | None = None,
        llm_attn_implementation: str = "sdpa",
        image3d_slice_fusion: str = "concat",
        source: dict | None = None,
        box_refs: list | None = None,
        model_max_length: int | None = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(llm_config, dict):
            llm_config = dict(llm_config)
            model_type = llm_config.pop("model_type", None)
            _check_choice("llm_config.model_type", model_type, SUPPORTED_LLM_TYPES)
            llm_config = AutoConfig.for_model(model_type, **llm_config)
        elif llm_config is not None:
            if not isinstance(llm_config, PretrainedConfig):
                raise ConfigError(f"llm_config must be a dict or a transformers config, got {type(llm_config).__name__}")
            _check_choice("llm_config.model_type", llm_config.model_type, SUPPORTED_LLM_TYPES)
        self.llm_config = llm_config
        self.encoder_image = validate_encoder_spec(encoder_image, "encoder_image")
        self.encoder_image3d = validate_encoder_spec(encoder_image3d, "encoder_image3d")
        self.connector_image = validate_connector_spec(connector_image, "connector_image")
        self.connector_image3d = validate_connector_spec(connector_image3d, "connector_image3d")
        for enc, con in (("encoder_image", "connector_image"), ("encoder_image3d", "connector_image3d")):
            if getattr(self, enc) is not None and getattr(self, con) is None:
                raise ConfigError(f"{enc} is set but {con} is None; give the connector spec too")
        if not isinstance(template, str) or not template:
            raise ConfigError(f"template = {template!r} must be a template name such as 'qwen2'")
        self.template = template
        if preprocessing is not None and not isinstance(preprocessing, dict):
            raise ConfigError(f"preprocessing must be a dict {{'image': ..., 'image3d': ...}}, got {preprocessing!r}")
        self.preprocessing = copy.deepcopy(preprocessing) if preprocessing else {}
        _check_choice("padding_side", padding_side, PADDING_SIDES)
        self.padding_side = padding_side
        # Stored as ``model_max_length``: PretrainedConfig owns ``max_length`` (a generation default).
        max_length = model_max_length if model_max_length is not None else (2048 if max_length is None else max_length)
        if not isinstance(max_length, int) or max_length < 1:
            raise ConfigError(f"max_length = {max_length!r} must be a positive int")
        self.model_max_length = max_length
        _check_choice("llm_attn_implementation", llm_attn_implementation, ATTN_IMPLEMENTATIONS)
        self.llm_attn_implementation = llm_attn_implementation
        _check_choice("image3d_slice_fusion", image3d_slice_fusion, SLICE_FUSIONS)
        self.image3d_slice_fusion = image3d_slice_fusion
        self.source = dict(source or {})
        if box_refs is not None:
            from medmvl_core.model.box_refs import check_labels

            box_refs = check_labels(box_refs)
            if box_ref_kind(self) is None:
                raise ConfigError("box_refs needs a convvit3d encoder (encoder_image3d, or encoder_image for a 2D "
                                  "model) with box_refs: true (its box head gives the boxes)")
        self.box_refs = box_refs
        kwargs.pop("max_length", None)
        if llm_config is not None:
            kwargs.setdefault("tie_word_embeddings", bool(getattr(llm_config, "tie_word_embeddings", False)))
            self.hidden_size = llm_config.hidden_size  # DeepSpeed auto-config reads it
        self._init_done = False
        super().__init__(**kwargs)
        self._init_done = True

    # PretrainedConfig's __init__ assigns ``max_length`` (a generation default of 20); ours is the
    # processor's maximum sequence length, so ``max_length`` reads ``model_max_length``.
    @property
    def max_length(self) -> int:
        return self.__dict__.get("model_max_length", 20)

    @max_length.setter
    def max_length(self, value: int) -> None:
        if self.__dict__.get("_init_done"):
            self.model_max_length = value

    def _get_non_default_generation_parameters(self) -> dict[str, Any]:
        out = super()._get_non_default_generation_parameters()
        out.pop("max_length", None)  # not a generation setting here (see ``max_length``)
        return out

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("_init_done", None)
        if isinstance(self.llm_config, PretrainedConfig):
            out["llm_config"] = self.llm_config.to_dict()
        return out


def box_ref_kind(config: "MedMVLConfig") -> str | None:
    """The input kind whose encoder gives a ``box_refs`` model's boxes: ``"image3d"`` (a convvit3d
    encoder_image3d, the CT demo) or ``"image"`` (a convvit3d encoder_image, the radiograph demo);
    None when neither encoder is a convvit3d."""
    for kind in ("image3d", "image"):
        spec = getattr(config, f"encoder_{kind}", None)
        if spec is not None and spec.get("type") == "convvit3d":
            return kind
    return None
