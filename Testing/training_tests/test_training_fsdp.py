"""FSDP (accelerate's FSDP plugin, FSDP2 = torch's fully_shard) on two CPU processes (gloo).

Full finetuning and LoRA train the same loss curve as one process with the same global batch
(2 processes x 1 vs 1 process x 2 accumulation steps); the resumable checkpoint is sharded (one
torch.distributed.checkpoint file per rank) and resuming from it continues the same curve; final/
is consolidated and loads without FSDP (load_checkpoint, medmvl-train merge, medmvl infer).
Tolerance: relative 1e-5 on losses and gradient norms (float32; the sums run in another order).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from training.config import load_config
from training.recipe import run
from training.testing import CONFIGS, INPUTS, REPO_ROOT, launch, losses, write_dataset
from training.testing import assert_close_rel as _close
from training.testing import assert_same_adapter
from training.testing import run_overrides as _common

FSDP_CPU = REPO_ROOT / "training" / "accelerate" / "fsdp_cpu_test.yaml"
pytestmark = pytest.mark.slow


def test_fsdp_full_finetune_sharded_checkpoint_resume(tmp_path):
    data = write_dataset(tmp_path / "data", "image", n=4)
    cfg = CONFIGS / "tiny_scratch_cpu.yaml"
    common = _common(data, 2, 3)
    out = tmp_path / "fsdp"
    first = launch(FSDP_CPU, ["--config", str(cfg), *common, f"train.output_dir={out}", "train.stop_after=2"])
    assert first.returncode == 0, first.stderr[-3000:]
    assert "FSDP (version 2) on CPU processes" in first.stderr
    ckpt = out / "checkpoints" / "step-2" / "accelerate_state"
    for part in ("pytorch_model_fsdp_0", "optimizer_0"):  # one shard file per rank
        assert sorted(p.name for p in (ckpt / part).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"], part
    assert not (out / "final").exists()
    second = launch(FSDP_CPU, ["--config", str(cfg), *common, f"train.output_dir={out}", "--resume"])
    assert second.returncode == 0, second.stderr[-3000:]

    one = tmp_path / "one"
    single = run(load_config(cfg, common + ["train.grad_accum=2", f"train.output_dir={one}"]))
    assert single["steps"] == 3
    _close(losses(out), losses(one))
    _close(losses(out, "grad_norm"), losses(one, "grad_norm"))
    assert losses(out)[2] != losses(out)[1]
    # final/ is consolidated: one ordinary safetensors file with every weight, as one process writes it
    wa, wb = load_file(str(out / "final" / "model.safetensors")), load_file(str(one / "final" / "model.safetensors"))
    assert set(wa) == set(wb)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k
    from medmvl_core.model import load_checkpoint

    model, _ = load_checkpoint(str(out / "final"))
    assert model.config.llm_config.hidden_size == 64


def test_fsdp_lora_matches_one_process_and_merges(tmp_path):
    data = write_dataset(tmp_path / "data", "image", n=4)
    cfg = CONFIGS / "tiny_2d_lora_cpu.yaml"
    common = _common(data, 1, 2) + ["train.merge_at_end=false"]
    out = tmp_path / "fsdp"
    proc = launch(FSDP_CPU, ["--config", str(cfg), *common, f"train.output_dir={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = tmp_path / "one"
    run(load_config(cfg, common + ["train.grad_accum=2", f"train.output_dir={one}"]))
    _close(losses(out), losses(one))
    assert_same_adapter(out, one)
    # the adapter written under FSDP merges and answers like any other
    from medmvl_core.cli import main as medmvl
    from training.cli import main as medmvl_train

    merged = tmp_path / "merged"
    assert medmvl_train(["merge", "--adapter", str(out / "final"), "--out", str(merged)]) == 0
    inp = REPO_ROOT / "Testing" / "data" / "medmvl_reference" / "inputs" / "cxr_inference.json"
    answers = tmp_path / "answers.json"
    assert medmvl(["infer", "--checkpoint", str(merged), "--data", str(inp), "--image-dir", str(INPUTS),
                   "--output", str(answers), "--max-new-tokens", "4", "--device", "cpu"]) == 0
    res = json.loads(answers.read_text(encoding="utf-8"))
    assert res and all(r["conversations"][-1]["from"] == "gpt" for r in res)
