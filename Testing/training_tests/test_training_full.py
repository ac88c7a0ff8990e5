"""Full finetuning from scratch: LLM and encoder built from config dicts (random init), a tokenizer
from a folder; every part trains; the output is a self-contained checkpoint load_checkpoint reads."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from medmvl_core.errors import ConfigError
from training.build import build_model
from training.config import load_config
from training.recipe import run
from training.testing import CONFIGS, INPUTS, REFERENCE


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    out = tmp_path_factory.mktemp("scratch")
    cfg = load_config(CONFIGS / "tiny_scratch_cpu.yaml",
                      [f"train.output_dir={out}", "train.max_steps=3", "log.progress_bar=false",
                       "log.peak_tflops=0.001", "log.tensorboard=true"])
    init, _ = build_model(cfg)  # same seed -> the run's initial weights
    init_sd = {k: v.clone() for k, v in init.state_dict().items()}
    return out, run(cfg), init_sd


def test_every_part_changes_and_loss_decreases(scratch):
    out, result, init = scratch
    assert result["steps"] == 3
    final = load_file(str(out / "final" / "model.safetensors"))
    for prefix in ("llm.model.layers.0.", "encoder_image.encoder.vision_model.encoder.layers.0.", "connector_image."):
        keys = [k for k in final if k.startswith(prefix) and k.endswith("weight")]
        assert keys and any(not torch.equal(final[k], init[k]) for k in keys), prefix
    losses = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]


def test_throughput_metrics_logged(scratch):
    out, _, _ = scratch
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for r in recs:
        assert r["samples_per_s"] > 0 and r["tokens_per_s"] > r["samples_per_s"]
        assert r["mfu"] == pytest.approx(r["tflops"] / 0.001, rel=1e-9)
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_output_loads_and_reproduces_the_trained_model(scratch):
    from medmvl_core.model import load_checkpoint

    out, _, _ = scratch
    model, proc = load_checkpoint(str(out / "final"))
    assert model.config.llm_config.hidden_size == 64 and model.encoder_image is not None
    assert len(proc.tokenizer) == 800  # the fixture tokenizer given as model.tokenizer
    conv = [{"from": "human", "value": "<image>\nIs there any pleural effusion?"}]
    batch = proc.collate([proc(conv, image=str(INPUTS / "cxr.png"))])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       images=batch["images"]).logits
    assert torch.isfinite(logits).all() and logits.shape[-1] == 832


def test_tokenizer_larger_than_vocab_is_rejected(tmp_path):
    cfg = load_config(CONFIGS / "tiny_scratch_cpu.yaml",
                      [f"train.output_dir={tmp_path}", "model.llm.config.vocab_size=512",
                       f"model.tokenizer={REFERENCE / 'base' / 'llm'}"])
    with pytest.raises(ConfigError, match="vocab_size"):
        build_model(cfg)


def test_3d_vit_recipe_trains_encoder_and_connector(tmp_path):
    from medmvl_core.model import load_checkpoint

    cfg = load_config(CONFIGS / "tiny_ct_m3d_cpu.yaml", [f"train.output_dir={tmp_path}", "log.progress_bar=false"])
    init, _ = build_model(cfg)
    result = run(cfg)
    assert result["steps"] == 2
    model, proc = load_checkpoint(str(tmp_path / "final"))
    assert model.encoder_image3d is not None and proc.num_image_tokens == {"image3d": 16}
    final = model.state_dict()
    init_sd = init.state_dict()
    changed = {k.split(".")[0] for k in final if not torch.equal(final[k], init_sd[k])}
    assert changed == {"encoder_image3d", "connector_image3d"}
