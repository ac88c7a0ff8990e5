"""Stage 1 (connector) then stage 2 (LoRA) on the fixture's CT data, with the fixture base models.

Checks: the loss goes down; only the parts that should train change (compared with the fixture's
base weight files); the encoder cache is filled then hit; the merged checkpoint loads with
``load_checkpoint`` and gives the same logits as base + adapter unmerged.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from training.config import load_config
from training.recipe import run
from training.testing import CONFIGS, INPUTS, REFERENCE


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    out = tmp_path_factory.mktemp("ct_stages")
    common = ["log.progress_bar=false", "log.every=1"]
    cfg1 = load_config(CONFIGS / "tiny_ct_pretrain_cpu.yaml",
                       common + [f"train.output_dir={out / 's1'}", f"data.cache_dir={out / 'cache'}",
                                 "data.datasets.0.ratio=3"])
    r1 = run(cfg1)
    cfg2 = load_config(CONFIGS / "tiny_ct_finetune_lora_cpu.yaml",
                       common + [f"model.init_from={out / 's1' / 'final'}", f"train.output_dir={out / 's2'}",
                                 "data.datasets.0.ratio=3"])
    r2 = run(cfg2)
    return out, r1, r2


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if json.loads(line)["split"] == "train"]


def test_stage1_trains_only_the_connector(stages):
    out, r1, _ = stages
    assert r1["steps"] == 3
    final = load_file(str(out / "s1" / "final" / "model.safetensors"))
    base_llm = load_file(str(REFERENCE / "base" / "llm" / "model.safetensors"))
    base_vis = load_file(str(REFERENCE / "base" / "siglip" / "model.safetensors"))
    for k, v in base_llm.items():
        assert torch.equal(final["llm." + k], v), k
    for k, v in base_vis.items():
        assert torch.equal(final["encoder_image.encoder." + k], v), k
    assert any(k.startswith("connector_image.") for k in final)
    losses = _losses(out / "s1")
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert (out / "s1" / "loss_curve.png").stat().st_size > 1000


def test_stage1_encoder_cache_filled_then_hit(stages):
    out, _, _ = stages
    files = list((out / "cache").rglob("*.safetensors"))
    assert len(files) == 1  # one CT volume
    feats = load_file(str(files[0]))["features"]
    assert feats.shape == (32, 16, 32)  # 32 slices x 16 SigLIP patches x hidden 32
    recs = [json.loads(line) for line in (out / "s1" / "metrics.jsonl").read_text().splitlines()]
    assert recs[-1]["cache_misses"] == 1 and recs[-1]["cache_hits"] == 2


def test_stage2_lora_trains_adapter_and_connector_only(stages):
    out, _, r2 = stages
    adapter = out / "s2" / "final"
    conf = json.loads((adapter / "adapter_config.json").read_text())
    assert conf["tune"]["llm"] == "lora" and conf["base"] == str((out / "s1" / "final").resolve())
    lora = load_file(str(adapter / "adapter_model.safetensors"))
    other = load_file(str(adapter / "trained_modules.safetensors"))
    assert lora and all(k.startswith("llm.") and "lora_" in k for k in lora)
    assert any(".q_proj.lora_A" in k for k in lora) and any(".down_proj.lora_B" in k for k in lora)
    assert other and all(k.startswith("connector_image.") for k in other)
    # lora_B starts at zero: trained adapters are not
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)
    stage1 = load_file(str(out / "s1" / "final" / "model.safetensors"))
    merged = load_file(str(out / "s2" / "merged" / "model.safetensors"))
    for k, v in stage1.items():
        if k.startswith("encoder_image.") or "embed_tokens" in k or "norm" in k:
            assert torch.equal(merged[k], v), k
    assert not torch.equal(merged["llm.model.layers.0.self_attn.q_proj.weight"],
                           stage1["llm.model.layers.0.self_attn.q_proj.weight"])
    losses = _losses(out / "s2")
    assert losses[-1] < losses[0]


def test_merged_checkpoint_loads_and_equals_unmerged(stages):
    from medmvl_core.model import load_checkpoint
    from training.merge import apply_adapter

    out, _, _ = stages
    merged, proc = load_checkpoint(str(out / "s2" / "merged"))
    base, _ = load_checkpoint(str(out / "s1" / "final"))
    apply_adapter(base, out / "s2" / "final")
    conv = json.loads((INPUTS / "ct_inference.json").read_text())[0]["conversations"]
    inputs = proc(conv, image3d=str(INPUTS / "ct_volume.npy"), mode="generate")
    batch = proc.collate([inputs])
    with torch.no_grad():
        a = merged.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          images3d=batch["images3d"]).logits
        b = base.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        images3d=batch["images3d"]).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()


def test_merge_cli_and_errors(stages, tmp_path, capsys):
    from training.cli import main

    out, _, _ = stages
    assert main(["merge", "--adapter", str(out / "s2" / "final"), "--out", str(tmp_path / "m")]) == 0
    a = load_file(str(tmp_path / "m" / "model.safetensors"))
    b = load_file(str(out / "s2" / "merged" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert main(["merge", "--adapter", str(out / "s1" / "final"), "--out", str(tmp_path / "x")]) == 2
    assert "not an adapter folder" in capsys.readouterr().err


def test_merged_checkpoint_answers_in_the_worker_engine(stages):
    from medmvl_core.imaging import read_image
    from medmvl_core.worker.loading import load_engine

    out, _, _ = stages
    engine = load_engine(out / "s2" / "merged", device="cpu")
    ans = engine.answer(read_image(str(INPUTS / "ct_volume.npy")), "Is there any pleural effusion?", max_new_tokens=3)
    assert isinstance(ans.text, str) and ans.timings["new_tokens"] >= 1


def test_cache_is_transparent(stages, tmp_path):
    # the same stage-1 run without the encoder cache gives the same losses and connector weights
    out, _, _ = stages
    cfg = load_config(CONFIGS / "tiny_ct_pretrain_cpu.yaml",
                      ["log.progress_bar=false", "log.every=1", "log.loss_curve=false", f"train.output_dir={tmp_path}",
                       "data.cache_encoder_outputs=false", "data.datasets.0.ratio=3"])
    run(cfg)
    assert _losses(tmp_path) == pytest.approx(_losses(out / "s1"), abs=1e-6)
    a = load_file(str(tmp_path / "final" / "model.safetensors"))
    b = load_file(str(out / "s1" / "final" / "model.safetensors"))
    for k in a:
        if k.startswith("connector_image."):
            assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_validate_with_checkpoint_checks_lengths(stages, tmp_path, capsys):
    from training.cli import main

    out, _, _ = stages
    args = ["validate", "--data", str(INPUTS / "ct_finetune.json"), "--image3d-dir", str(INPUTS),
            "--checkpoint", str(out / "s1" / "final")]
    assert main(args) == 0
    assert "tokens per sample (with image tokens): min 127" in capsys.readouterr().out  # MedM-VL: 127
    assert main(args + ["--max-length", "100"]) == 1
    assert "too_long 1" in capsys.readouterr().out


def test_bad_training_rows_error_or_counted_skip(stages, tmp_path, caplog):
    from medmvl_core.data.datasets import load_records
    from medmvl_core.errors import DataError
    from medmvl_core.model import load_checkpoint
    from training.data import check_rows

    out, _, _ = stages
    _, proc = load_checkpoint(str(out / "s1" / "final"))
    rows = json.loads((INPUTS / "ct_finetune.json").read_text())
    long_row = json.loads(json.dumps(rows[0]))
    long_row["id"] = "long"
    long_row["conversations"][1]["value"] = "The heart size is normal. " * 40
    (tmp_path / "d.json").write_text(json.dumps([rows[0], long_row]))
    recs = load_records(tmp_path / "d.json", image3d_dir=INPUTS)
    with pytest.raises(DataError, match="too_long"):
        check_rows(recs, proc, 256, "error", "d.json")
    good, skipped = check_rows(recs, proc, 256, "skip", "d.json")
    assert [r.id for r in good] == ["ct_finetune_0"] and skipped == 1
    assert "skipping 1 of 2 rows" in caplog.text and "too_long: 1" in caplog.text


def test_pretrain_template_rows(stages, tmp_path):
    from medmvl_core.data.datasets import load_records
    from medmvl_core.errors import DataError
    from medmvl_core.model import load_checkpoint
    from medmvl_core.processing import MedMVLProcessor
    from training.data import check_rows
    from training.testing import write_dataset

    out, _, _ = stages
    _, proc = load_checkpoint(str(out / "s1" / "final"))
    pre = MedMVLProcessor(proc.tokenizer, template="pretrain_image3d", num_image_tokens=proc.num_image_tokens,
                          preprocessing=proc.preprocessing, max_length=512)
    pairs = load_records(write_dataset(tmp_path, "image3d", n=2), image3d_dir=INPUTS)
    good, skipped = check_rows(pairs, pre, 512, "error", "pairs")
    assert len(good) == 2 and skipped == 0
    multi = load_records(INPUTS / "ct_finetune.json", image3d_dir=INPUTS)   # 2 human turns, 1 volume
    with pytest.raises(DataError, match="2 image3d position"):
        check_rows(multi, pre, 512, "error", "ct_finetune.json")


def test_two_datasets_mix_by_ratio(stages, tmp_path):
    from collections import Counter

    from medmvl_core.model import load_checkpoint
    from training.data import load_train_data
    from training.testing import write_dataset

    out, _, _ = stages
    _, proc = load_checkpoint(str(out / "s1" / "final"))
    extra = write_dataset(tmp_path, "image3d", n=4)
    cfg = load_config(CONFIGS / "tiny_ct_pretrain_cpu.yaml",
                      ["data.datasets.0.ratio=2", f"data.datasets.1={{path: {extra}, image3d_dir: {INPUTS}, ratio: 0.5}}"])
    data = load_train_data(cfg, proc, 512)
    assert data.sizes == [1, 4] and data.epoch_len == 4
    order = data.epoch_order(0, seed=0)
    src = Counter("a" if i < data.offsets[1] else "b" for i in order)
    assert src == {"a": 2, "b": 2} and len(set(i for i in order if i >= data.offsets[1])) == 2
    assert order == data.epoch_order(0, seed=0)
