"""Our self-contained checkpoint format: save -> load gives identical outputs, offline."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from medmvl_core.model import MedMVLConfig, MedMVLForConditionalGeneration, load_checkpoint
from medmvl_core.model.loader import load_model_and_tokenizer, save_checkpoint

from test_model_tiny import build, sample_inputs  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer(reference_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(reference_dir / "base" / "llm"))


def _outputs(model, kind):
    ids, labels, pix = sample_inputs(model, kind)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, **pix)
        new = model.generate(ids, torch.ones_like(ids), **pix, max_new_tokens=3, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out.logits, out.loss, new


@pytest.mark.parametrize("llm,encoder,connector,kind", [
    ("qwen2", "siglip", "attn_pooling", "image3d"),   # tied head, 2D encoder per slice
    ("llama", "m3dclip", "spatial_pooling", "image3d"),  # untied head, 3D encoder
    ("phi", "clip", "mlp", "image"),
])
def test_save_load_round_trip_identical(tmp_path, tokenizer, llm, encoder, connector, kind):
    model = build(llm, encoder, connector)
    before = _outputs(model, kind)
    save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    loaded, proc = load_checkpoint(tmp_path / "ckpt")
    assert isinstance(loaded, MedMVLForConditionalGeneration) and not loaded.training
    after = _outputs(loaded, kind)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1]) and torch.equal(before[2], after[2])
    tied = loaded.llm.lm_head.weight.data_ptr() == loaded.llm.get_input_embeddings().weight.data_ptr()
    assert tied == bool(model.config.llm_config.tie_word_embeddings)
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["model_type"] == "medmvl" and cfg["llm_config"]["model_type"] == llm
    if proc is not None:  # the processing package is there
        assert proc.num_image_tokens[kind] == loaded.num_image_tokens(kind)


def test_sharded_save_writes_index_and_loads(tmp_path, tokenizer):
    model = build("qwen2", "medmclip", "attn_pooling")
    before = _outputs(model, "image3d")
    save_checkpoint(model, tokenizer, tmp_path / "ckpt", max_shard_size="100KB")
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded, _ = load_model_and_tokenizer(tmp_path / "ckpt")
    after = _outputs(loaded, "image3d")
    assert all(torch.equal(a, b) for a, b in zip(before, after))


def test_auto_classes_know_medmvl(tmp_path, tokenizer):
    model = build("qwen2", "siglip", "mlp")
    save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    cfg = AutoConfig.from_pretrained(tmp_path / "ckpt")
    assert isinstance(cfg, MedMVLConfig)
    for auto in (AutoModel, AutoModelForCausalLM):
        m = auto.from_pretrained(tmp_path / "ckpt")
        assert isinstance(m, MedMVLForConditionalGeneration)
        sd, ref = m.state_dict(), model.state_dict()
        assert all(torch.equal(sd[k], ref[k]) for k in ref)


def test_load_in_bfloat16(tmp_path, tokenizer):
    model = build("qwen2", "siglip", "mlp")
    save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    loaded, _ = load_checkpoint(tmp_path / "ckpt", dtype=torch.bfloat16)
    assert loaded.llm.dtype == torch.bfloat16 and loaded.encoder_image.encoder.dtype == torch.bfloat16
    ids, _, pix = sample_inputs(loaded, "image")
    with torch.no_grad():
        logits = loaded(input_ids=ids, attention_mask=torch.ones_like(ids), **pix).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
