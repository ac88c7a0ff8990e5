"""Error paths: registries, config validation, placeholder/feature count mismatches."""

from __future__ import annotations

import pytest
import torch

from medmvl_core.errors import ConfigError, PlaceholderError, RegistryError
from medmvl_core.model import (
    CONNECTORS,
    ENCODERS,
    IMAGE_TOKEN_INDEX,
    MedMVLConfig,
    build_connector,
    build_encoder,
    register_connector,
    register_encoder,
)

from test_model_tiny import LLMS, SIGLIP, build, tiny_config  # noqa: E402  (Testing/ is on sys.path)


def test_unknown_encoder_lists_valid_names():
    with pytest.raises(RegistryError) as exc:
        build_encoder({"type": "resnet", "config": {}})
    msg = str(exc.value)
    assert "resnet" in msg and all(name in msg for name in ("clip", "siglip", "m3dclip", "medmclip"))


def test_unknown_connector_lists_valid_names():
    with pytest.raises(RegistryError) as exc:
        build_connector({"type": "qformer", "name": "mlp2x_gelu"}, 16, 32, [2, 2])
    assert "qformer" in str(exc.value) and "attn_pooling" in str(exc.value)


def test_duplicate_registration_raises():
    with pytest.raises(RegistryError, match="already registered"):
        register_encoder("siglip", ENCODERS["siglip"])
    with pytest.raises(RegistryError, match="already registered"):
        register_connector("mlp", CONNECTORS["mlp"])


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"encoder_image": {"type": "vit", "config": SIGLIP}, "connector_image": {"type": "mlp"}}, "'vit'"),
        ({"encoder_image": {"type": "siglip", "config": SIGLIP, "select_feature": "cls"},
          "connector_image": {"type": "mlp"}}, "select_feature"),
        ({"encoder_image": {"type": "siglip", "config": SIGLIP}, "connector_image": {"type": "mlp", "name": "mlp2x_relu"}},
         "mlp2x_relu"),
        ({"encoder_image": {"type": "siglip", "config": SIGLIP}, "connector_image": {"type": "perceiver"}}, "perceiver"),
        ({"encoder_image": {"type": "siglip", "config": SIGLIP}}, "connector_image"),
        ({"padding_side": "middle"}, "middle"),
        ({"max_length": 0}, "max_length"),
        ({"llm_attn_implementation": "flex"}, "flex"),
    ],
)
def test_config_validation_names_bad_value(kwargs, needle):
    with pytest.raises(ConfigError) as exc:
        MedMVLConfig(llm_config=LLMS["qwen2"], **kwargs)
    assert needle in str(exc.value)


def test_unsupported_llm_type_lists_allowed():
    with pytest.raises(ConfigError) as exc:
        MedMVLConfig(llm_config={"model_type": "gpt2"})
    assert "gpt2" in str(exc.value) and "qwen2" in str(exc.value) and "phi3" in str(exc.value)


def test_placeholder_count_mismatch_raises_with_counts():
    model = build("qwen2", "siglip", "mlp")
    n = model.num_image_tokens("image")
    image = torch.randn(1, 3, 16, 16)
    ids = torch.tensor([[5] + [IMAGE_TOKEN_INDEX] * (n - 1) + [6]])  # one copy short
    with pytest.raises(PlaceholderError) as exc:
        model(input_ids=ids, attention_mask=torch.ones_like(ids), images=image)
    assert f"tokens: {n - 1}" in str(exc.value) and f"features: {n}" in str(exc.value)
    two = torch.tensor([[5] + [IMAGE_TOKEN_INDEX] * (2 * n) + [6]])  # two images' worth, one image
    with pytest.raises(PlaceholderError):
        model.generate(two, torch.ones_like(two), images=image, max_new_tokens=1)


def test_placeholders_without_image_and_image_without_placeholders():
    model = build("qwen2", "siglip", "mlp")
    n = model.num_image_tokens("image")
    ids = torch.tensor([[5] + [IMAGE_TOKEN_INDEX] * n + [6]])
    with pytest.raises(PlaceholderError, match="no image"):
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    text = torch.tensor([[5, 6, 7]])
    with pytest.raises(PlaceholderError, match="tokens: 0"):
        model(input_ids=text, attention_mask=torch.ones_like(text), images=torch.randn(1, 3, 16, 16))


def test_features_dict_missing_a_kind_raises():
    model = build("qwen2", "siglip", "mlp")
    n = model.num_image_tokens("image")
    ids = torch.tensor([[5] + [IMAGE_TOKEN_INDEX] * n + [-201, 6]])
    feats = {"image": model.encode_images(images=torch.randn(1, 3, 16, 16))}
    with pytest.raises(PlaceholderError, match="image3d.*tokens: 1, features: 0"):
        model.embed_inputs(ids, feats)


def test_kind_without_encoder_raises():
    model = build("qwen2", "m3dclip", "mlp")
    with pytest.raises(ConfigError, match="no 2D image encoder"):
        model.num_image_tokens("image")
    with pytest.raises(ConfigError, match="'video'"):
        model.num_image_tokens("video")


def test_spatial_pooling_2d_encoder_cannot_take_volumes():
    model = build("qwen2", "siglip", "spatial_pooling")
    with pytest.raises(ConfigError, match="spatial_pooling"):
        model.num_image_tokens("image3d")


def test_config_without_llm_cannot_build_model():
    from medmvl_core.model import MedMVLForConditionalGeneration

    with pytest.raises(ConfigError, match="llm_config"):
        MedMVLForConditionalGeneration(MedMVLConfig())


def test_config_dict_round_trip_keeps_everything():
    cfg = tiny_config("phi3", "medmclip", "attn_pooling")
    again = MedMVLConfig.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()
    assert again.llm_config.model_type == "phi3" and again.encoder_image3d["type"] == "medmclip"
    assert again.model_max_length == 256
