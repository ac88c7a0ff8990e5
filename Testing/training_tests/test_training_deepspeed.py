"""DeepSpeed ZeRO-2 and ZeRO-3 through accelerate on two CPU processes (DeepSpeed's CPU accelerator,
gloo), against one process with the same global batch (2 x 1 vs 1 x 2 accumulation steps).

ZeRO-3: the resumable checkpoint holds one partition per rank, resuming from it continues the same
curve, and the final save gathers the 16-bit weights into an ordinary checkpoint that loads without
DeepSpeed. ZeRO-2: LoRA, the adapter equals one process's. Tolerance: relative 1e-5 on losses.
Skipped, with the reason shown, where deepspeed is not installed (it is the optional `deepspeed`
extra: its source build imports torch, so it needs `pip install --no-build-isolation deepspeed`).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from safetensors.torch import load_file

from training.config import load_config
from training.recipe import run
from training.testing import CONFIGS, REPO_ROOT, launch, losses, write_dataset
from training.testing import assert_close_rel as _close
from training.testing import assert_same_adapter
from training.testing import run_overrides as _common

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                 reason="deepspeed is not installed (optional extra: "
                                        "pip install --no-build-isolation deepspeed)")]
ACC = REPO_ROOT / "training" / "accelerate"
ENV = {"DS_ACCELERATOR": "cpu"}


def test_zero3_full_finetune_resume_and_gathered_save(tmp_path):
    data = write_dataset(tmp_path / "data", "image", n=4)
    cfg = CONFIGS / "tiny_scratch_cpu.yaml"
    common = _common(data, 2, 3)
    out = tmp_path / "zero3"
    first = launch(ACC / "deepspeed_zero3_cpu_test.yaml", ["--config", str(cfg), *common, f"train.output_dir={out}",
                                                            "train.stop_after=2"], env=ENV)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "DeepSpeed ZeRO-3 on CPU processes" in first.stderr
    parts = out / "checkpoints" / "step-2" / "accelerate_state" / "pytorch_model"
    assert sorted(p.name for p in parts.glob("*_optim_states.pt")) == \
        ["zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    second = launch(ACC / "deepspeed_zero3_cpu_test.yaml", ["--config", str(cfg), *common, f"train.output_dir={out}",
                                                             "--resume"], env=ENV)
    assert second.returncode == 0, second.stderr[-3000:]
    one = tmp_path / "one"
    run(load_config(cfg, common + ["train.grad_accum=2", f"train.output_dir={one}"]))
    _close(losses(out), losses(one))
    wa, wb = load_file(str(out / "final" / "model.safetensors")), load_file(str(one / "final" / "model.safetensors"))
    assert set(wa) == set(wb)
    for k in wa:  # gathered: full shapes, not the empty ZeRO-3 placeholders
        assert wa[k].shape == wb[k].shape and torch.allclose(wa[k], wb[k], atol=1e-4), k
    from medmvl_core.model import load_checkpoint

    model, _ = load_checkpoint(str(out / "final"))  # this process has no DeepSpeed engine
    assert model.config.llm_config.hidden_size == 64


def test_zero2_lora_matches_one_process(tmp_path):
    data = write_dataset(tmp_path / "data", "image", n=4)
    cfg = CONFIGS / "tiny_2d_lora_cpu.yaml"
    common = _common(data, 1, 2)
    out = tmp_path / "zero2"
    proc = launch(ACC / "deepspeed_zero2_cpu_test.yaml", ["--config", str(cfg), *common, f"train.output_dir={out}"],
                  env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DeepSpeed ZeRO-2 on CPU processes" in proc.stderr
    one = tmp_path / "one"
    run(load_config(cfg, common + ["train.grad_accum=2", f"train.output_dir={one}"]))
    _close(losses(out), losses(one))
    assert_same_adapter(out, one)
