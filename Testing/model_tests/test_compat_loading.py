"""Loading MedM-VL folders: shards + index, tied/untied heads, a folder with no base models, bad weights."""

from __future__ import annotations

import argparse
import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from medmvl_core.errors import CheckpointError
from medmvl_core.model import load_checkpoint
from medmvl_core.model.loader import load_model_and_tokenizer


def _copy(reference_dir, tmp_path, name, with_base=True):
    root = tmp_path / "fixture"
    shutil.copytree(reference_dir / name, root / name, ignore=shutil.ignore_patterns("golden", "golden.json"))
    if with_base:
        shutil.copytree(reference_dir / "base", root / "base")
    return root / name


def _logits(model, kind="image3d"):
    n = model.num_image_tokens(kind)
    ids = torch.tensor([[5, 6] + [-201 if kind == "image3d" else -200] * n + [7, 8]])
    x = torch.linspace(-1, 1, 3 * 32 * 32 * 32).view(1, 3, 32, 32, 32)
    pix = {"images3d": x} if kind == "image3d" else {"images": x[:, :, 0]}
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), **pix).logits


def test_sharded_safetensors_with_index(reference_dir, tmp_path, monkeypatch):
    ckpt = _copy(reference_dir, tmp_path, "ct_chest_tiny")
    monkeypatch.chdir(tmp_path)
    ref, _ = load_model_and_tokenizer(ckpt)
    state = load_file(str(ckpt / "model.safetensors"))
    (ckpt / "model.safetensors").unlink()
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    weight_map = {}
    for fname, ks in shards.items():
        save_file({k: state[k] for k in ks}, str(ckpt / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in ks})
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model, _ = load_model_and_tokenizer(ckpt)
    assert torch.equal(_logits(model), _logits(ref))
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        load_model_and_tokenizer(ckpt)


def test_head_checkpoint_without_lm_head_is_tied_with_a_warning(reference_dir, tmp_path, caplog):
    ckpt = _copy(reference_dir, tmp_path, "2d_tiny")
    state = load_file(str(ckpt / "model.safetensors"))
    del state["llm.lm_head.weight"]
    save_file(state, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING):
        model, _ = load_model_and_tokenizer(ckpt)
    assert model.llm.lm_head.weight.data_ptr() == model.llm.get_input_embeddings().weight.data_ptr()
    assert "lm_head" in caplog.text


def test_v1_folder_alone_uses_nested_configs_and_its_own_tokenizer(reference_dir, tmp_path, monkeypatch):
    """No base/ folder anywhere: v1 configs carry the LLM and encoder configs, the tokenizer is in the folder."""
    ckpt = _copy(reference_dir, tmp_path, "ct_chest_tiny_v1_schema", with_base=False)
    monkeypatch.chdir(tmp_path)
    model, tokenizer = load_model_and_tokenizer(ckpt)
    assert str(ckpt.resolve()) in tokenizer.name_or_path
    assert len(tokenizer) == 800 and tokenizer.eos_token_id == 799 and tokenizer.pad_token_id == 797
    assert model.num_image_tokens("image3d") == 256
    assert model.config.preprocessing["image3d"]["kind"] == "volume_preprocessed"
    assert model.config.preprocessing["image3d"]["normalize"]["mean"] == [0.5, 0.5, 0.5]


def test_head_folder_alone_without_base_fails_clearly(reference_dir, tmp_path, monkeypatch):
    from medmvl_core.errors import MissingBaseModelError

    ckpt = _copy(reference_dir, tmp_path, "2d_tiny", with_base=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(MissingBaseModelError, match="base/llm"):
        load_checkpoint(ckpt)


def test_weights_that_do_not_fit_the_config_raise(reference_dir, tmp_path):
    ckpt = _copy(reference_dir, tmp_path, "2d_tiny")
    state = load_file(str(ckpt / "model.safetensors"))
    state["connector_image.extra.weight"] = torch.zeros(2)
    del state["connector_image.connector.0.bias"]
    save_file(state, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as exc:
        load_model_and_tokenizer(ckpt)
    assert "connector_image.connector.0.bias" in str(exc.value) and "connector_image.extra.weight" in str(exc.value)


def test_pickle_only_and_non_checkpoint_folders(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(CheckpointError, match="neither"):
        load_checkpoint(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text(json.dumps({"model_type": "lvlm", "lvlm_llm_type": "qwen2",
                                                            "lvlm_llm_name_or_path": "Qwen/Qwen2.5-3B-Instruct"}))
    (tmp_path / "a" / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(CheckpointError, match="safetensors only"):
        load_checkpoint(tmp_path / "a")


def test_convert_refuses_a_non_empty_destination(reference_dir, tmp_path):
    from medmvl_core.commands import convert

    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "x").write_text("keep me")
    args = argparse.Namespace(src=str(reference_dir / "2d_tiny"), dst=str(tmp_path / "dst"), dtype=None,
                              max_shard_size="5GB")
    with pytest.raises(CheckpointError, match="not empty"):
        convert.run(args)
    assert (tmp_path / "dst" / "x").read_text() == "keep me"


def test_convert_refuses_to_write_over_its_source(reference_dir, tmp_path):
    import shutil

    from medmvl_core.commands import convert

    src = tmp_path / "ckpt"
    shutil.copytree(reference_dir / "2d_tiny", src)
    before = (src / "model.safetensors").read_bytes()
    args = argparse.Namespace(src=str(src), dst=str(src), dtype=None, max_shard_size="5GB")
    with pytest.raises(CheckpointError, match="must differ"):
        convert.run(args)
    assert (src / "model.safetensors").read_bytes() == before


def test_convert_cli_end_to_end(reference_dir, tmp_path, monkeypatch, capsys):
    from medmvl_core.cli import main

    ckpt = _copy(reference_dir, tmp_path, "2d_tiny")
    monkeypatch.chdir(tmp_path)
    assert main(["convert", str(ckpt), str(tmp_path / "out"), "--max-shard-size", "300KB"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == "medmvl" and cfg["source"]["format"] == "lvlm_head"
    a, _ = load_model_and_tokenizer(ckpt)
    b, _ = load_model_and_tokenizer(tmp_path / "out")
    assert torch.equal(_logits(a, "image"), _logits(b, "image"))


def test_imported_preprocessing_specs_follow_the_fixture(reference_dir, tmp_path, monkeypatch):
    """Specs derived from MedM-VL folders: values from the fixture README (surprise 5 and the SigLIP processor)."""
    from medmvl_core.imaging.spec import validate_spec

    monkeypatch.chdir(tmp_path)
    norm = {"type": "image_processor", "image_size": 32, "resample": 3, "rescale": 0.00392156862745098,
            "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    ct, _ = load_model_and_tokenizer(reference_dir / "ct_chest_tiny")
    vol = validate_spec(ct.config.preprocessing["image3d"])
    assert vol["kind"] == "volume" and vol["hu_window"] == [-1000, 1000] and vol["crop_foreground"] is True
    assert vol["size"] == [32, 32, 32] and vol["cast_uint8"] is True and vol["channels"] == 3
    assert vol["normalize"] == norm
    two_d, _ = load_model_and_tokenizer(reference_dir / "2d_tiny")
    img = validate_spec(two_d.config.preprocessing["image"])
    assert img["kind"] == "image" and img["normalize"] == norm
    v1, _ = load_model_and_tokenizer(reference_dir / "ct_chest_tiny_v1_schema")
    assert validate_spec(v1.config.preprocessing["image3d"])["kind"] == "volume_preprocessed"
