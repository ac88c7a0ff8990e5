"""QLoRA on CPU (bitsandbytes 4-bit NF4 + LoRA), including the eval -> train packing quirk."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from training.config import load_config
from training.recipe import run
from training.testing import CONFIGS, INPUTS
from training.tuning import quantize_llm_4bit, unpack_4bit_for_training

bnb = pytest.importorskip("bitsandbytes")


class _Tiny(nn.Module):
    """Trainable layer feeding a 4-bit layer with LoRA: the shape of a connector feeding the LLM."""

    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(64, 64)
        self.llm = nn.Module()
        self.llm.q_proj = nn.Linear(64, 64)

    def forward(self, x):
        return self.llm.q_proj(self.pre(x))


def _tiny_qlora():
    from peft import LoraConfig, LoraModel

    torch.manual_seed(0)
    m = _Tiny()
    assert quantize_llm_4bit(m, "nf4", True, "float32") == 1
    LoraModel(m, LoraConfig(r=4, target_modules=["q_proj"]), "default")
    for n, p in m.named_parameters():
        p.requires_grad_("lora_" in n or n.startswith("pre."))
    return m


def _train_step(m, opt, x):
    m.train()
    loss = m(x).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()


def test_eval_then_train_quirk_is_handled():
    m = _tiny_qlora()
    layer = m.llm.q_proj.base_layer
    assert isinstance(layer, bnb.nn.Linear4bit)
    x = torch.randn(3, 64)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    _train_step(m, opt, x)
    m.eval()
    with torch.no_grad():
        ref = m(x)
    packed = getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    if packed:  # this CPU repacks 4-bit weights for inference: the next training step fails...
        with pytest.raises(RuntimeError, match="leaf Variable"):
            _train_step(m, opt, x)
        opt.zero_grad()
    # ...until the weights are converted back, which the recipe does after every eval
    assert unpack_4bit_for_training(m) == (1 if packed else 0)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    m.eval()
    with torch.no_grad():  # the same 4-bit weights either way
        assert torch.allclose(m(x), ref, atol=1e-5)
    unpack_4bit_for_training(m)
    _train_step(m, opt, x)


def test_qlora_recipe_with_eval_every_step(tmp_path):
    cfg = load_config(CONFIGS / "tiny_2d_qlora_cpu.yaml",
                      [f"train.output_dir={tmp_path / 'q'}", "train.max_steps=3", "log.progress_bar=false",
                       "train.merge_at_end=true", f"data.datasets.0.image_dir={INPUTS}"])
    result = run(cfg)
    assert result["steps"] == 3
    recs = [json.loads(x) for x in (tmp_path / "q" / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in recs if r["split"] == "train"]
    evals = [r["loss"] for r in recs if r["split"] == "eval"]
    assert len(train) == 3 and len(evals) == 3       # a train step after each eval: the quirk is handled
    assert train[-1] < train[0] and evals[-1] < evals[0]
    conf = json.loads((tmp_path / "q" / "final" / "adapter_config.json").read_text())
    assert conf["tune"]["llm"] == "qlora"
    from medmvl_core.model import load_checkpoint

    model, _ = load_checkpoint(str(tmp_path / "q" / "merged"))
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
