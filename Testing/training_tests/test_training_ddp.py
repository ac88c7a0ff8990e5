"""DDP with two CPU processes (gloo, launched by torchrun) gives the same loss curve and weights as
one process with the same global batch (2 = 2 processes x 1 vs 1 process x 2 accumulation steps).
Rows have different lengths and answers, so each process sees different data."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training.config import load_config
from training.recipe import run
from training.testing import CONFIGS, INPUTS, REPO_ROOT, write_dataset


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(d: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines()]


def test_two_process_ddp_matches_one_process(tmp_path):
    data = write_dataset(tmp_path / "data", "image", n=4)
    common = [f"data.datasets.0.path={data}", f"data.datasets.0.image_dir={INPUTS}", "data.datasets.0.ratio=1",
              "train.micro_batch_size=1", "train.max_steps=2", "tune.lora.dropout=0.0", "log.progress_bar=false",
              "log.every=1", "log.loss_curve=false", "log.tensorboard=false"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "training.cli", "--config",
           str(CONFIGS / "tiny_2d_lora_cpu.yaml"), *common, "train.grad_accum=1", f"train.output_dir={tmp_path / 'ddp'}"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = run(load_config(CONFIGS / "tiny_2d_lora_cpu.yaml",
                             common + ["train.grad_accum=2", f"train.output_dir={tmp_path / 'one'}"]))
    assert single["steps"] == 2
    recs = [json.loads(x) for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in recs] == [0.5, 1.0]   # global batch 2 of 4 rows: both processes counted
    ddp, one = _losses(tmp_path / "ddp"), _losses(tmp_path / "one")
    assert len(ddp) == len(one) == 2
    for a, b in zip(ddp, one):
        assert abs(a - b) <= 1e-5 * abs(b), (ddp, one)
    assert ddp[1] != ddp[0]
    # the same gradient, not only the same loss (a wrong 1/N scaling would show here, before clipping)
    gd = [r["grad_norm"] for r in recs]
    go = [json.loads(x)["grad_norm"] for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert gd == [pytest.approx(g, rel=1e-5) for g in go]
    wa = load_file(str(tmp_path / "ddp" / "final" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "one" / "final" / "adapter_model.safetensors"))
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5), k
