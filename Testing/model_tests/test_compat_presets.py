"""Offline base-model presets and the resolution order (local folder, HF cache, preset, error)."""

from __future__ import annotations

import json

import pytest
import torch

from medmvl_core.errors import MissingBaseModelError
from medmvl_core.model import MedMVLForConditionalGeneration
from medmvl_core.model.encoders import build_encoder
from medmvl_core.model.medmvl_compat import import_config
from medmvl_core.model.presets import get_preset, list_presets, resolve_base

REQUIRED = [
    "Qwen/Qwen2.5-3B-Instruct", "meta-llama/Llama-3.2-3B-Instruct", "microsoft/phi-2",
    "microsoft/Phi-3-mini-4k-instruct", "microsoft/Phi-3-mini-128k-instruct",
    "google/siglip-base-patch16-256-multilingual", "google/siglip-so400m-patch14-384",
    "openai/clip-vit-large-patch14-336", "GoodBaiBai88/M3D-CLIP", "shiym2000/MedM-CLIP-CT",
]

# Published parameter counts: the hub's safetensors totals for the released weights (tied
# embeddings counted once): Qwen2.5-3B 3.09B, Llama-3.2-3B 3.21B, phi-2 2.78B, Phi-3-mini 3.82B.
LLM_PARAMS = {"Qwen/Qwen2.5-3B-Instruct": 3_085_938_688, "meta-llama/Llama-3.2-3B-Instruct": 3_212_749_824,
              "microsoft/phi-2": 2_779_683_840, "microsoft/Phi-3-mini-4k-instruct": 3_821_079_552,
              "microsoft/Phi-3-mini-128k-instruct": 3_821_079_552}
# Vision tokens per input: SigLIP 256/16 -> 16x16, so400m 384/14 -> 27x27, CLIP-L 336/14 -> 24x24 + CLS
# (LLaVA-1.5's 576 patches), M3D-CLIP / MedM-CLIP 32x256x256 / 4x16x16 -> 8x16x16 + CLS.
VISION_TOKENS = {"google/siglip-base-patch16-256-multilingual": ("siglip", 256),
                 "google/siglip-so400m-patch14-384": ("siglip", 729),
                 "openai/clip-vit-large-patch14-336": ("clip", 577),
                 "GoodBaiBai88/M3D-CLIP": ("m3dclip", 2049), "shiym2000/MedM-CLIP-CT": ("medmclip", 2049)}


def test_every_required_preset_is_shipped():
    assert set(REQUIRED) <= set(list_presets())


@pytest.mark.parametrize("name", list(LLM_PARAMS))
def test_llm_presets_build_with_published_size(name):
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(get_preset(name)["config"])
    cfg = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert n == LLM_PARAMS[name], f"{name}: {n} parameters"


@pytest.mark.parametrize("name", list(VISION_TOKENS))
def test_vision_presets_build_and_count_tokens(name):
    from medmvl_core.model.medmvl_compat import _vision_config

    enc_type, tokens = VISION_TOKENS[name]
    spec = {"type": enc_type, "config": _vision_config(get_preset(name)["config"]), "attn_implementation": "eager"}
    with torch.device("meta"):
        enc = build_encoder(spec)
    assert enc.num_tokens("cls_patch") == tokens


def test_released_2d_style_config_resolves_from_presets(tmp_path, monkeypatch):
    """A HEAD config naming hub ids only (like MedM-VL-2D-3B-en) resolves offline from presets."""
    monkeypatch.chdir(tmp_path)
    raw = {"model_type": "lvlm", "lvlm_llm_type": "qwen2", "lvlm_llm_name_or_path": "Qwen/Qwen2.5-3B-Instruct",
           "lvlm_llm_max_length": 2048, "lvlm_llm_padding_side": "right", "lvlm_encoder_image_type": "siglip",
           "lvlm_encoder_image_name_or_path": "google/siglip-so400m-patch14-384",
           "lvlm_encoder_image_select_layer": -2, "lvlm_encoder_image_select_feature": "patch",
           "lvlm_connector_image_type": "mlp", "lvlm_connector_image_name": "mlp2x_gelu"}
    imported = import_config(raw, tmp_path)
    cfg = imported.config
    assert cfg.llm_config.hidden_size == 2048 and cfg.encoder_image["config"]["hidden_size"] == 1152
    assert cfg.source["bases"] == {"llm": "Qwen/Qwen2.5-3B-Instruct", "encoder_image": "google/siglip-so400m-patch14-384"}
    assert cfg.preprocessing["image"]["normalize"]["image_size"] == 384
    assert cfg.preprocessing["image3d"]["size"] == [32, 384, 384]
    with torch.device("meta"):
        model = MedMVLForConditionalGeneration(cfg)
    assert model.num_image_tokens("image") == 728  # 729 patches, 'patch' drops the first (MedM-VL does)
    assert model.connector_image.connector[0].weight.shape == (2048, 1152)


def test_missing_base_model_error_names_it_and_says_how(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = {"model_type": "lvlm", "lvlm_llm_type": "qwen2", "lvlm_llm_name_or_path": "someone/Private-LLM-7B"}
    with pytest.raises(MissingBaseModelError) as exc:
        import_config(raw, tmp_path)
    msg = str(exc.value)
    assert "someone/Private-LLM-7B" in msg and "huggingface-cli download" in msg and "preset" in msg
    assert exc.value.code == "missing_base_model"


def test_local_folder_wins_over_preset_and_relative_paths(tmp_path, monkeypatch):
    local = tmp_path / "ckpts" / "Qwen" / "Qwen2.5-3B-Instruct"
    local.mkdir(parents=True)
    (local / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 64}))
    ckpt = tmp_path / "ckpts" / "run1"
    ckpt.mkdir()
    monkeypatch.chdir(tmp_path)  # not found relative to the CWD; found relative to the checkpoint's parent
    base = resolve_base("Qwen/Qwen2.5-3B-Instruct", ckpt)
    assert base.origin == "local" and base.config["hidden_size"] == 64
    monkeypatch.chdir(tmp_path / "ckpts")  # relative to the CWD (MedM-VL's rule) comes first
    assert resolve_base("Qwen/Qwen2.5-3B-Instruct", tmp_path / "elsewhere").origin == "local"
    assert resolve_base("Qwen/Qwen2.5-3B-Instruct", tmp_path / "elsewhere" / "x").folder == local.resolve()


def test_hf_cache_is_used_before_presets(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    cache = tmp_path / "hub"
    snap = cache / "models--google--siglip-so400m-patch14-384" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (cache / "models--google--siglip-so400m-patch14-384" / "refs").mkdir()
    (cache / "models--google--siglip-so400m-patch14-384" / "refs" / "main").write_text("abc123")
    (snap / "config.json").write_text(json.dumps({"model_type": "siglip_vision_model", "image_size": 224}))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    base = resolve_base("google/siglip-so400m-patch14-384", tmp_path / "ckpt")
    assert base.origin == "hf_cache" and base.config["image_size"] == 224
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    assert resolve_base("google/siglip-so400m-patch14-384", tmp_path / "ckpt").origin == "preset"
