"""Fault behaviour: a rank killed mid-run (SIGKILL, as a lost node) stops the other one with a
clear message, not a hang, and the run resumed from the last checkpoint (same launch command with
--resume) gives the loss curve of one uninterrupted process, as the single-process resume test does.
Launched as two nodes through training/slurm/launch.sbatch (see test_training_multinode.py).
"""

from __future__ import annotations

import json
import signal
import time

import pytest

from training.config import load_config
from training.recipe import run
from training.testing import CONFIGS, INPUTS, sbatch_locally, write_dataset

pytestmark = pytest.mark.slow


def _by_step(run_dir) -> dict:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r.get("split") == "train"}  # a re-logged step: the latest


def test_killed_rank_stops_the_other_and_resume_matches_one_process(tmp_path):
    import psutil

    data = write_dataset(tmp_path / "data", "image", n=4)
    cfg = CONFIGS / "tiny_2d_lora_cpu.yaml"
    common = [f"data.datasets.0.path={data}", f"data.datasets.0.image_dir={INPUTS}", "data.datasets.0.ratio=3",
              "train.micro_batch_size=1", "train.max_steps=12", "log.progress_bar=false", "log.every=1",
              "log.loss_curve=false", "log.tensorboard=false", "train.save_every=2", "train.dist_timeout_s=60"]
    out = tmp_path / "two"
    args = ["-m", "training.cli", "--config", str(cfg), *common, f"train.output_dir={out}"]

    # the two-node run in the background; rank 1 is killed once a checkpoint exists
    proc = sbatch_locally(tmp_path, args, background=True)
    t0 = time.time()
    while not (out / "checkpoints" / "step-2" / "trainer_state.json").is_file():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() - t0 < 400, "no checkpoint written"
        time.sleep(0.05)
    victims = [p for p in psutil.process_iter(["cmdline"]) if "training.cli" in " ".join(p.info["cmdline"] or [])
               and str(out) in " ".join(p.info["cmdline"] or []) and _env(p).get("RANK") == "1"]
    assert len(victims) == 1, victims
    victims[0].send_signal(signal.SIGKILL)
    t_kill = time.time()
    try:
        _, stderr = proc.communicate(timeout=180)  # the survivor must not hang
    finally:
        if proc.poll() is None:
            proc.kill()
    assert time.time() - t_kill < 120
    assert proc.returncode != 0
    assert "another process of this run stopped" in stderr, stderr[-3000:]
    assert "--resume" in stderr and "process 0 of 2" in stderr
    assert not (out / "final").exists()

    resumed = sbatch_locally(tmp_path, [*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    one = tmp_path / "one"
    run(load_config(cfg, common + ["train.grad_accum=2", f"train.output_dir={one}"]))
    two, single = _by_step(out), _by_step(one)
    assert sorted(two) == sorted(single) == list(range(1, 13))
    for s in single:
        assert abs(two[s] - single[s]) <= 1e-5 * abs(single[s]), (s, two, single)


def _env(p) -> dict:
    try:
        return p.environ()
    except Exception:  # a process that ended meanwhile, or another user's
        return {}
