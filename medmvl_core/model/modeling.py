"""``MedMVLForConditionalGeneration``: encoders + connectors + an ``AutoModelForCausalLM`` LLM.

The processor expands every ``<image>`` / ``<image3d>`` placeholder into N copies of its negative
id (-200 / -201); :meth:`embed_inputs` replaces the embeddings at those positions with the
projected vision features (``masked_scatter``) after checking that the counts agree. Because the
positions are the ones MedM-VL splices its features into, the LLM sees the same sequence.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from medmvl_core.errors import ConfigError, PlaceholderError
from medmvl_core.model.configuration import MedMVLConfig
from medmvl_core.model.connectors import build_connector
from medmvl_core.model.encoders import build_encoder

logger = logging.getLogger(__name__)

IMAGE_TOKEN_INDEX = -200
IMAGE3D_TOKEN_INDEX = -201
PLACEHOLDER_IDS = {"image": IMAGE_TOKEN_INDEX, "image3d": IMAGE3D_TOKEN_INDEX}
DEFAULT_SLICES = 32  # MedM-VL resizes every CT to 32 slices


class MedMVLPreTrainedModel(PreTrainedModel):
    config_class = MedMVLConfig
    base_model_prefix = "medmvl"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True

    def _init_weights(self, module: nn.Module) -> None:
        std = getattr(self.config.llm_config, "initializer_range", 0.02)
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv3d)):
            module.weight.data.normal_(mean=0.0, std=std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=std)


class MedMVLForConditionalGeneration(MedMVLPreTrainedModel):
    """The MedM-VL model. Submodule names (``llm``, ``encoder_image``, ``connector_image``,
    ``encoder_image3d``, ``connector_image3d``) match MedM-VL's so its weights load unchanged."""

    def __init__(self, config: MedMVLConfig) -> None:
        super().__init__(config)
        if config.llm_config is None:
            raise ConfigError("MedMVLConfig.llm_config is None; give the LLM's config dict (with model_type)")
        self.llm = AutoModelForCausalLM.from_config(
            config.llm_config, attn_implementation=config.llm_attn_implementation
        )
        hidden = config.llm_config.hidden_size
        self.encoder_image = self.connector_image = None
        self.encoder_image3d = self.connector_image3d = None
        if config.encoder_image is not None:
            self.encoder_image = build_encoder(config.encoder_image)
            self.connector_image = build_connector(
                config.connector_image, self.encoder_image.hidden_size, hidden, self.encoder_image.patch_grid()
            )
        if config.encoder_image3d is not None:
            self.encoder_image3d = build_encoder(config.encoder_image3d)
            self.connector_image3d = build_connector(
                config.connector_image3d, self.encoder_image3d.hidden_size, hidden, self.encoder_image3d.patch_grid()
            )
        if config.box_refs is not None:
            enc = self._box_ref_encoder()
            if not enc.box_refs or enc.dense_tokens != len(config.box_refs):
                raise ConfigError(f"box_refs names {len(config.box_refs)} labels; the convvit3d encoder needs box_refs: true "
                                  f"and dense_tokens {len(config.box_refs)} (it has box_refs {enc.box_refs}, "
                                  f"dense_tokens {enc.dense_tokens})")
        self._no_split_modules = list(getattr(self.llm, "_no_split_modules", None) or [])
        self.post_init()

    # -- embeddings / tying --------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.llm.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.llm.get_output_embeddings()

    def tie_weights(self, *args: Any, **kwargs: Any) -> None:
        """Tie the LLM head to its input embeddings iff the LLM config says so."""
        if getattr(self.config.llm_config, "tie_word_embeddings", False):
            self.llm.lm_head.weight = self.llm.get_input_embeddings().weight

    @property
    def _tied_weights_keys(self) -> list[str]:  # noqa: D401 - transformers reads it when saving
        return ["llm.lm_head.weight"] if getattr(self.config.llm_config, "tie_word_embeddings", False) else []

    # -- vision ----------------------------------------------------------------------------------
    def _slice_depth(self) -> int:
        spec = (self.config.preprocessing or {}).get("image3d") or {}
        size = spec.get("size")
        return int(size[0]) if size else DEFAULT_SLICES

    def num_image_tokens(self, kind: str) -> int:
        """How many placeholder copies one ``kind`` ("image" or "image3d") input needs."""
        if kind == "image":
            if self.encoder_image is None:
                raise ConfigError("this model has no 2D image encoder; it cannot take <image> inputs")
            enc, con, sel = self.encoder_image, self.connector_image, self.config.encoder_image
            return con.num_tokens(enc.num_tokens(sel["select_feature"]))
        if kind == "image3d":
            if self.encoder_image3d is not None:
                enc, con, sel = self.encoder_image3d, self.connector_image3d, self.config.encoder_image3d
                return con.num_tokens(enc.num_tokens(sel["select_feature"]))
            if self.encoder_image is not None:
                if self.config.encoder_image.get("type") == "convvit3d":  # a 2D-only encoder (the radiograph demo)
                    raise ConfigError("this model's 2D encoder (convvit3d) takes single images only; it cannot take "
                                      "<image3d> inputs")
                self._check_per_slice_connector()
                per_slice = self.encoder_image.num_tokens(self.config.encoder_image["select_feature"])
                if self.config.image3d_slice_fusion == "concat":
                    return self.connector_image.num_tokens(self._slice_depth() * per_slice)
                return self.connector_image.num_tokens(per_slice)
            raise ConfigError("this model has no vision encoder; it cannot take <image3d> inputs")
        raise ConfigError(f"kind = {kind!r} is not supported; use 'image' or 'image3d'")

    def _check_per_slice_connector(self) -> None:
        if self.config.image3d_slice_fusion == "concat" and self.config.connector_image["type"] == "spatial_pooling":
            raise ConfigError(
                "a 2D encoder with a spatial_pooling connector cannot take volumes (the concatenated slice tokens "
                "have no 2D grid); use an mlp or attn_pooling connector, or a 3D encoder"
            )

    def vision_features(self, kind: str, x: torch.Tensor) -> torch.Tensor:
        """Encoder output before the connector.

        image: [B, 3, H, W] -> [B, T, C]; image3d: [B, C, D, H, W] -> [B, T, C] with a 3D encoder,
        or [B*D, T, C] (one row per slice) when the 2D encoder runs per slice.
        """
        if kind == "image":
            spec = self.config.encoder_image
            return self.encoder_image(x, spec["select_layer"], spec["select_feature"])
        if self.encoder_image3d is not None:
            spec = self.config.encoder_image3d
            return self.encoder_image3d(x, spec["select_layer"], spec["select_feature"])
        if self.encoder_image is None:
            raise ConfigError("this model has no vision encoder; it cannot take <image3d> inputs")
        b, c, d, h, w = x.shape
        slices = x.transpose(1, 2).reshape(b * d, c, h, w).expand(b * d, 3, h, w)
        spec = self.config.encoder_image
        return self.encoder_image(slices, spec["select_layer"], spec["select_feature"])

    def project(self, kind: str, features: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
        """Connector output [B, N, hidden] for ``vision_features(kind, x)``."""
        per_slice = kind == "image3d" and self.encoder_image3d is None  # a 2D encoder run slice by slice
        connector = self.connector_image if kind == "image" or per_slice else self.connector_image3d
        param = next(connector.parameters(), None)
        if param is not None and param.is_floating_point() and features.dtype != param.dtype:
            features = features.to(param.dtype)  # an encoder kept in another dtype (bf16 vision on a CPU)
        if not per_slice:
            return connector(features)
        b = batch_size or 1
        self._check_per_slice_connector()
        if self.config.image3d_slice_fusion == "concat":
            return connector(features.reshape(b, -1, features.shape[-1]))
        out = connector(features)
        return out.reshape(b, -1, *out.shape[1:]).mean(dim=1)

    def encode_images(
        self, images: torch.Tensor | None = None, images3d: torch.Tensor | None = None
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Projected vision tokens.

        images: [B, 3, H, W]; images3d: [B, C, D, H, W]. Returns [B, N, hidden] when one kind is
        given, or ``{"image": ..., "image3d": ...}`` when both are.
        """
        out: dict[str, torch.Tensor] = {}
        if images is not None:
            out["image"] = self.project("image", self.vision_features("image", images))
        if images3d is not None:
            feats = self.vision_features("image3d", images3d)
            out["image3d"] = self.project("image3d", feats, batch_size=images3d.shape[0])
        if not out:
            raise PlaceholderError("encode_images needs images or images3d")
        return next(iter(out.values())) if len(out) == 1 else out

    @property
    def box_ref_kind(self) -> str | None:
        """The input kind ("image3d" or "image") whose encoder's box head gives the ``box_refs`` boxes;
        None for a model without ``box_refs``."""
        from medmvl_core.model.configuration import box_ref_kind

        return box_ref_kind(self.config) if self.config.box_refs is not None else None

    def _box_ref_encoder(self) -> nn.Module:
        kind = self.box_ref_kind
        if kind is None:
            raise ConfigError("this model has no box_refs (its boxes are plain text)")
        return getattr(self, f"encoder_{kind}").encoder.vision_encoder

    @torch.no_grad()
    def find_boxes(self, images: torch.Tensor) -> torch.Tensor:
        """The boxes that ``box_refs`` tokens stand for: [B, K, 6] (``[z1, y1, x1, z2, y2, x2]`` in 0-1 of
        the model input; a 2D model's span z 0-1) for the inputs of :attr:`box_ref_kind` (images3d
        [B, C, D, H, W] or images [B, C, H, W]), one per label of ``config.box_refs``."""
        enc = self._box_ref_encoder()
        return enc.find_boxes(images.to(enc.cls_token.dtype))[1]

    def resolve_box_refs(self, texts: list[str], images: torch.Tensor | None) -> list[str]:
        """``texts`` (one per input of ``images``, of :attr:`box_ref_kind`) with each box reference replaced
        by its box in the model's box text (3D for a CT model, 2D for a radiograph model); unchanged
        without ``box_refs`` or references."""
        from medmvl_core.model.box_refs import resolve_box_refs

        labels = self.config.box_refs
        if labels is None or images is None or not any("<|box:" in t for t in texts):
            return texts
        if images.shape[0] != len(texts):
            raise ConfigError(f"resolve_box_refs needs one image per answer, got {images.shape[0]} images for "
                              f"{len(texts)} answers")
        boxes = self.find_boxes(images).float().cpu()
        return [resolve_box_refs(t, b, labels, self.box_ref_kind) for t, b in zip(texts, boxes)]

    # -- text ------------------------------------------------------------------------------------
    def embed_inputs(
        self,
        input_ids: torch.LongTensor,
        image_embeds: torch.Tensor | dict[str, torch.Tensor] | None,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings [B, L, hidden] with vision features scattered at placeholder positions.

        ``image_embeds`` [B, N, hidden] fills every placeholder position (-200 and -201) in order;
        a dict ``{"image": ..., "image3d": ...}`` fills each kind's own positions. Positions where
        ``attention_mask`` is 0 get zero embeddings, as MedM-VL pads.
        """
        masks = {kind: input_ids == pid for kind, pid in PLACEHOLDER_IDS.items()}
        any_mask = masks["image"] | masks["image3d"]
        embeds = self.llm.get_input_embeddings()(input_ids.masked_fill(any_mask, 0))
        if image_embeds is None:
            if any_mask.any():
                raise PlaceholderError(
                    f"the input has {int(any_mask.sum())} image placeholder positions but no image was given; "
                    "pass images/images3d or remove the <image>/<image3d> placeholders"
                )
        else:
            groups = image_embeds.items() if isinstance(image_embeds, dict) else [("image or image3d", image_embeds)]
            for kind, feats in groups:
                mask = masks[kind] if kind in masks else any_mask
                rows = feats.reshape(-1, feats.shape[-1])
                n_pos = int(mask.sum())
                if n_pos != rows.shape[0]:
                    raise PlaceholderError(
                        f"{kind} features and placeholder tokens do not match: tokens: {n_pos}, features: "
                        f"{rows.shape[0]} ({list(feats.shape[:-1])}); the processor must expand each placeholder "
                        "into model.num_image_tokens(kind) copies, one per image"
                    )
                embeds = embeds.masked_scatter(mask.unsqueeze(-1).expand_as(embeds), rows.to(embeds.dtype))
            if isinstance(image_embeds, dict):
                for kind, mask in masks.items():
                    if kind not in image_embeds and mask.any():
                        raise PlaceholderError(
                            f"{kind} features and placeholder tokens do not match: tokens: {int(mask.sum())}, "
                            f"features: 0; give the {kind} input or remove its placeholders"
                        )
        if attention_mask is not None and attention_mask.shape == input_ids.shape:
            embeds = embeds * attention_mask.unsqueeze(-1).to(embeds.dtype)
        return embeds

    def _inputs_embeds(self, input_ids, attention_mask, images, images3d, image_embeds) -> torch.Tensor:
        if image_embeds is None and (images is not None or images3d is not None):
            image_embeds = self.encode_images(images, images3d)  # a dict keyed by kind when both are given
        return self.embed_inputs(input_ids, image_embeds, attention_mask)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        images: torch.Tensor | None = None,
        images3d: torch.Tensor | None = None,
        image_embeds: torch.Tensor | dict[str, torch.Tensor] | None = None,
        past_key_values: Any = None,
        use_cache: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits [B, L, vocab] and, with ``labels`` (-100 = ignored), the mean shifted CE loss."""
        if inputs_embeds is None:
            inputs_embeds = self._inputs_embeds(input_ids, attention_mask, images, images3d, image_embeds)
        if labels is None:
            kwargs.pop("num_items_in_batch", None)
        kwargs["return_dict"] = True  # wrappers such as PEFT pass return_dict too
        return self.llm(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            labels=labels,
            past_key_values=past_key_values,
            use_cache=use_cache,
            position_ids=position_ids,
            **kwargs,
        )

    @classmethod
    def can_generate(cls) -> bool:
        """False for transformers' purposes: ``generate`` here is our own and drives the inner
        LLM's ``GenerationMixin``; the outer model has no generation config of its own."""
        return False

    def prepare_inputs_for_generation(self, *args: Any, **kwargs: Any) -> dict:
        """Delegates to the LLM (PEFT's causal-LM wrapper looks this up on the base model)."""
        return self.llm.prepare_inputs_for_generation(*args, **kwargs)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        images3d: torch.Tensor | None = None,
        image_embeds: torch.Tensor | dict[str, torch.Tensor] | None = None,
        **generate_kwargs: Any,
    ) -> torch.LongTensor:
        """Greedy / sampling / beam search; returns only the new tokens [B, new_tokens]. A ``box_refs``
        model may write box reference tokens: pass the decoded texts through :meth:`resolve_box_refs`
        (as ``medmvl infer`` and the engine do) to show the boxes."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        inputs_embeds = self._inputs_embeds(input_ids, attention_mask, images, images3d, image_embeds)
        generate_kwargs.setdefault("use_cache", True)
        # Driven by inputs_embeds only, transformers returns just the new tokens (or a
        # GenerateOutput with return_dict_in_generate=True).
        return self.llm.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **generate_kwargs)


AutoConfig.register("medmvl", MedMVLConfig, exist_ok=True)
AutoModel.register(MedMVLConfig, MedMVLForConditionalGeneration, exist_ok=True)
AutoModelForCausalLM.register(MedMVLConfig, MedMVLForConditionalGeneration, exist_ok=True)
