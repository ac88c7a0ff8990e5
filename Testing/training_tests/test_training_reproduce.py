"""The reproduce configs (training/configs/reproduce/) against the original MedM-VL training scripts.

ORIGINALS is transcribed by hand from MSIIP/MedM-VL: scripts/train/* at the release commit 5a90f80
(MedM-VL-2D-3B-en, MedM-VL-CT-Chest-3B-en), scripts/train/MedM-VL-CT-3B-en/* at b5e0f00 (v1.0) and
examples/finetune_{2d,3d}.sh at HEAD 225fc0f. "gpus" is the `deepspeed --include localhost:...`
count; "aug" the encoder's MONAI train transform (lvlm/model/encoder/*.py at the same commit):
(flip probability per axis, intensity scale/shift) or None; None data template = the model's.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from medmvl_core.data.datasets import random_flip_rot90
from medmvl_core.errors import ConfigError
from training.config import TrainConfig, config_problems, load_config, plan_global_batch, resolve_attn_implementation

REPRO = Path(__file__).resolve().parents[2] / "training" / "configs" / "reproduce"

ORIGINALS = {
    "medmvl_2d_3b_pretrain": dict(
        script="5a90f80 scripts/train/MedM-VL-2D/pretrain_en.sh", llm="Qwen2.5-3B-Instruct", max_length=2048,
        encoder=("image", "siglip", "siglip-base-patch16-256-multilingual", -1, "cls_patch"),
        connector=("mlp", "mlp2x_gelu"), template="qwen2", data_template="pretrain", data="pretrain_llava.json",
        tune=dict(llm="frozen", encoder="frozen", connector="full"), epochs=1, per_device=64, accum=2, gpus=2,
        lr=1e-3, aug=None),
    "medmvl_2d_3b_finetune": dict(
        script="5a90f80 scripts/train/MedM-VL-2D/finetune_en.sh", template=None, data_template=None,
        data="train_unimed.json", tune=dict(llm="full", encoder="full", connector="full"), encoder=("image",),
        epochs=3, per_device=16, accum=4, gpus=2, lr=2e-5, aug=None, init_from="medmvl_2d_3b/pretrain"),
    "ct_chest_3b_pretrain": dict(
        script="5a90f80 scripts/train/MedM-VL-CT-Chest/pretrain_en.sh", llm="Qwen2.5-3B-Instruct", max_length=2048,
        encoder=("image", "siglip", "siglip-base-patch16-256-multilingual", -1, "cls_patch"),
        connector=("attn_pooling", "mlp2x_gelu"), template="qwen2", data_template="pretrain_image3d",
        data="train_rg.json", tune=dict(llm="frozen", encoder="frozen", connector="full"), epochs=1,
        per_device=16, accum=1, gpus=2, lr=1e-3, aug=(0.1, False)),
    "ct_chest_3b_finetune": dict(
        script="5a90f80 scripts/train/MedM-VL-CT-Chest/finetune_en.sh", template=None, data_template=None,
        data="train_vqa.json", tune=dict(llm="full", encoder="full", connector="full"), encoder=("image",),
        epochs=1, per_device=8, accum=1, gpus=2, lr=2e-5, aug=(0.1, False), init_from="ct_chest_3b/pretrain"),
    "ct_3b_v1_pretrain": dict(
        script="b5e0f00 scripts/train/MedM-VL-CT-3B-en/pretrain.sh", llm="Llama-3.2-3B-Instruct", max_length=512,
        encoder=("image3d", "m3dclip", "M3D-CLIP", -1, "patch"), connector=("spatial_pooling", "mlp2x_gelu"),
        template="llama3", data_template="pretrain_image3d", data="m3d_pretrain.json",
        tune=dict(llm="frozen", encoder="frozen", connector="full"), epochs=3, per_device=32, accum=1, gpus=2,
        lr=1e-4, aug=(0.1, True)),
    "ct_3b_v1_finetune": dict(
        script="b5e0f00 scripts/train/MedM-VL-CT-3B-en/finetune.sh", template=None, data_template=None,
        data="m3d_finetune.json", tune=dict(llm="full", encoder="frozen", connector="full"), encoder=("image3d",),
        epochs=4, per_device=16, accum=1, gpus=2, lr=5e-5, aug=(0.1, True), init_from="ct_3b_v1/pretrain",
        max_length=512),
    "lora_finetune_3d": dict(
        script="225fc0f examples/finetune_3d.sh", template=None, data_template=None, data="finetune_3d.json",
        tune=dict(llm="lora", encoder="frozen", connector="full"), encoder=("image",), epochs=1, per_device=8,
        accum=1, gpus=2, lr=2e-4, aug=(0.1, False), lora=(128, 256, 0.05), init_from="MedM-VL-CT-Chest-3B-en"),
    "lora_finetune_2d": dict(
        script="225fc0f examples/finetune_2d.sh", template=None, data_template=None, data="finetune_2d.json",
        tune=dict(llm="lora", encoder="frozen", connector="full"), encoder=("image",), epochs=1, per_device=16,
        accum=4, gpus=2, lr=2e-4, aug=None, lora=(128, 256, 0.05), init_from="MedM-VL-2D-3B-en"),
}
# the same in every script: cosine schedule, warm-up 0.03, weight decay 0, bf16, gradient checkpointing,
# FlashAttention-2, 8 loader workers, no "gradient_clipping" in the zero*.json (DeepSpeed default 0)
COMMON = dict(scheduler="cosine", warmup_ratio=0.03, weight_decay=0.0, precision="bf16", gradient_checkpointing=True,
              num_workers=8, max_grad_norm=0.0)


def test_one_reproduce_config_per_released_model_and_stage():
    assert sorted(p.stem for p in REPRO.glob("*.yaml")) == sorted(ORIGINALS)


@pytest.mark.parametrize("name", sorted(ORIGINALS))
def test_reproduce_config_matches_original_script(name):
    o = ORIGINALS[name]
    path = REPRO / f"{name}.yaml"
    text = path.read_text()
    commit, script = o["script"].split(" ")
    assert commit in text and script in text, "the header must name the script and commit it mirrors"
    cfg = load_config(path)
    assert config_problems(cfg) == []
    m, t, d, tr = cfg.model, cfg.tune, cfg.data, cfg.train
    for k, v in COMMON.items():
        assert getattr(tr, k) == v, k
    assert m.attn_implementation == "auto"
    assert (tr.lr, tr.epochs, tr.micro_batch_size, tr.grad_accum) == (o["lr"], o["epochs"], o["per_device"], o["accum"])
    assert tr.global_batch == o["per_device"] * o["accum"] * o["gpus"]
    assert Path(d.datasets[0].path).name == o["data"] and len(d.datasets) == 1
    assert d.template == o["data_template"]
    kind = o["encoder"][0]
    assert getattr(t, f"encoder_{kind}") == o["tune"]["encoder"]
    assert getattr(t, f"connector_{kind}") == o["tune"]["connector"]
    assert t.llm == o["tune"]["llm"]
    if "init_from" in o:  # stage 2: the parts and the template come from the stage-1 checkpoint
        assert o["init_from"] in m.init_from and m.llm is None
    else:
        assert Path(m.llm.path).name == o["llm"] and m.template == o["template"] and m.max_length == o["max_length"]
        _, etype, epath, layer, feature = o["encoder"]
        enc, con = getattr(m, f"encoder_{kind}"), getattr(m, f"connector_{kind}")
        assert (enc.type, Path(enc.path).name, enc.options["select_layer"], enc.options["select_feature"]) == \
            (etype, epath, layer, feature)
        assert (con.type, con.options["name"]) == o["connector"]
    if "max_length" in o:
        assert m.max_length == o["max_length"]
    if o["aug"] is None:
        assert not d.augment
    else:
        assert d.augment and (d.augment_flip_p, d.augment_intensity) == o["aug"]
        assert not d.cache_encoder_outputs  # a cache would fix one view per volume
    if "lora" in o:
        assert (t.lora.r, t.lora.alpha, t.lora.dropout) == o["lora"]
        assert t.lora.target_modules is None  # the original passes none: peft's default


def test_null_lora_targets_are_peft_defaults():
    from training.tuning import lora_targets

    qwen = SimpleNamespace(llm=SimpleNamespace(config=SimpleNamespace(model_type="qwen2")))
    llama = SimpleNamespace(llm=SimpleNamespace(config=SimpleNamespace(model_type="llama")))
    assert sorted(lora_targets(qwen, None)) == ["q_proj", "v_proj"]
    assert sorted(lora_targets(llama, None)) == ["q_proj", "v_proj"]
    assert lora_targets(qwen, ["o_proj"]) == ["o_proj"]
    odd = SimpleNamespace(llm=SimpleNamespace(config=SimpleNamespace(model_type="no_such_llm")))
    with pytest.raises(ConfigError, match="no default"):
        lora_targets(odd, None)


def test_global_batch_warns_or_adapts():
    tr = TrainConfig(micro_batch_size=8, grad_accum=1, global_batch=16, lr=2e-5)
    assert plan_global_batch(tr, 2) == (1, None)
    accum, msg = plan_global_batch(tr, 8)       # the shipped 8-process accelerate files: 4x the batch
    assert accum == 1 and "global batch is 64" in msg and "global_batch=16" in msg
    accum, msg = plan_global_batch(tr, 1)
    assert accum == 1 and "train.grad_accum=2" in msg
    tr.adapt_grad_accum = True
    assert plan_global_batch(tr, 1)[0] == 2
    accum, msg = plan_global_batch(tr, 8)       # 8 x 8 > 16: cannot adapt, says so
    assert accum == 1 and "no whole accumulation" in msg
    assert plan_global_batch(TrainConfig(micro_batch_size=8), 8) == (1, None)  # no stated batch: silent


def test_config_rejects_bad_new_fields():
    cfg = load_config(REPRO / "ct_chest_3b_finetune.yaml",
                      ["data.augment_flip_p=1.5", "train.global_batch=-1", "model.attn_implementation=fast",
                       "tune.lora.target_modules=[]"], validate=False)
    problems = "\n".join(config_problems(cfg))
    for key in ("data.augment_flip_p", "train.global_batch", "model.attn_implementation", "tune.lora.target_modules"):
        assert key in problems


def test_attn_auto_falls_back_to_sdpa_without_flash_attn():
    import importlib.util

    import torch

    want = "flash_attention_2" if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") else "sdpa"
    assert resolve_attn_implementation("auto") == want
    assert resolve_attn_implementation("eager") == "eager"


def test_medmvl_flip_probability_and_intensity():
    """MedM-VL's transform: RandFlip(prob=0.1) per axis, RandScaleIntensity/RandShiftIntensity(0.1, p=0.5)."""
    vol = np.random.default_rng(0).random((1, 4, 6, 6), dtype=np.float32) + 1.0
    n, flips_d, scaled_or_shifted = 4000, 0, 0
    for e in range(n):
        rng = np.random.Generator(np.random.PCG64([1, e]))
        out = random_flip_rot90(vol, rng, flip_p=0.1, intensity=False)
        # D is never rotated, so a D flip shows as slice 0 of the output holding the last input slice's values
        flips_d += bool(np.allclose(np.sort(out[0, 0], None), np.sort(vol[0, -1], None)))
        out_i = random_flip_rot90(vol, np.random.Generator(np.random.PCG64([1, e])), flip_p=0.1, intensity=True)
        ratio = np.sort(out_i, None) / np.sort(out, None)
        diff = np.sort(out_i, None) - np.sort(out, None)
        scaled_or_shifted += not np.allclose(out_i, out)
        # x * (1 + a) + b with |a|, |b| <= 0.1
        a = (diff[-1] - diff[0]) / (np.sort(out, None)[-1] - np.sort(out, None)[0])
        assert abs(a) <= 0.1 + 1e-4 and np.all(np.abs(diff - a * np.sort(out, None)) <= 0.1 + 1e-4)
        assert np.isfinite(ratio).all()
    assert 0.08 < flips_d / n < 0.12                  # p = 0.1 (binomial sd 0.005)
    assert 0.70 < scaled_or_shifted / n < 0.80        # 1 - 0.5 * 0.5
