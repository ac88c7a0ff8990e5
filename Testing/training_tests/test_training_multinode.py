"""Multi-node rehearsal: training/slurm/launch.sbatch, the launch the docs give for a SLURM cluster,
run as two "nodes" on this machine: `srun` and `scontrol` are stand-ins that start the task once
per node (SLURM_NODEID 0 and 1) and name 127.0.0.1 as the allocation's first host, so the script's
own rendezvous logic (torchrun --nnodes 2 --node_rank $SLURM_NODEID, one process per node, gloo)
is what runs. Training equals one process with the same global batch; `medmvl infer` shards the
data over the two nodes and merges in input order.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess

import pytest

from training.config import load_config
from training.recipe import run
from training.testing import (CONFIGS, INPUTS, REFERENCE, REPO_ROOT, SBATCH, assert_close_rel, losses, run_overrides,
                              sbatch_locally, write_dataset)

pytestmark = pytest.mark.slow


def _sbatch(tmp_path, args: list):
    return sbatch_locally(tmp_path, args)


def test_two_node_training_equals_one_process(tmp_path):
    data = write_dataset(tmp_path / "data", "image", n=4)
    cfg = CONFIGS / "tiny_2d_lora_cpu.yaml"
    common = run_overrides(data, 1, 2)
    proc = _sbatch(tmp_path, ["-m", "training.cli", "--config", str(cfg), *common,
                              f"train.output_dir={tmp_path / 'two'}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 node(s) x 1 process(es), rendezvous 127.0.0.1" in proc.stderr
    one = tmp_path / "one"
    run(load_config(cfg, common + ["train.grad_accum=2", f"train.output_dir={one}"]))
    two_l = losses(tmp_path / "two")
    assert len(two_l) == 2
    assert_close_rel(two_l, losses(one))
    assert (tmp_path / "two" / "final" / "adapter_model.safetensors").is_file()


def test_two_node_infer_shards_and_merges(tmp_path):
    out = tmp_path / "out.json"
    proc = _sbatch(tmp_path, ["-m", "medmvl_core.cli", "-v", "infer", "--checkpoint", str(REFERENCE / "ct_chest_tiny"),
                              "--data", str(INPUTS / "ct_inference.json"), "--image3d-dir", str(INPUTS),
                              "--output", str(out), "--max-new-tokens", "12", "--device", "cpu"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 process(es)" in proc.stderr
    assert "rank 0: 1 samples" in proc.stderr and "rank 1: 1 samples" in proc.stderr
    golden = json.loads((REFERENCE / "ct_chest_tiny" / "golden.json").read_text())
    expected = [(s["id"], s["generated_text"][0]) for s in golden["inference_samples"]]
    res = json.loads(out.read_text(encoding="utf-8"))
    assert [(r["id"], r["conversations"][-1]["value"]) for r in res] == expected


def test_launch_script_refuses_to_run_outside_slurm(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", str(SBATCH), "-m", "training.cli"], env=env, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode != 0 and "SLURM_NNODES is not set" in proc.stderr


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                    reason="deepspeed is not installed (optional extra: pip install --no-build-isolation deepspeed)")
def test_two_node_deepspeed_through_accelerate(tmp_path):
    """The accelerate branch of launch.sbatch (ACCELERATE_CONFIG, DeepSpeed's standard multi-node
    launcher): ZeRO-2 over two nodes equals one process."""
    data = write_dataset(tmp_path / "data", "image", n=4)
    cfg = CONFIGS / "tiny_scratch_cpu.yaml"
    common = run_overrides(data, 1, 2) + ["train.save_final=false"]
    acc_cfg = REPO_ROOT / "training" / "accelerate" / "deepspeed_zero2_cpu_test.yaml"
    proc = sbatch_locally(tmp_path, ["-m", "training.cli", "--config", str(cfg), *common,
                                     f"train.output_dir={tmp_path / 'two'}"],
                          extra_env={"ACCELERATE_CONFIG": str(acc_cfg), "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DeepSpeed ZeRO-2 on CPU processes" in proc.stderr
    one = tmp_path / "one"
    run(load_config(cfg, common + ["train.grad_accum=2", f"train.output_dir={one}"]))
    two_l = losses(tmp_path / "two")
    assert len(two_l) == 2
    assert_close_rel(two_l, losses(one))
