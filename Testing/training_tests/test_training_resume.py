"""Resume for real: a run stopped mid-way and resumed ends with the same weights as an
uninterrupted run (optimizer, scheduler, RNG — LoRA dropout is on — and data position restored)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from medmvl_core.errors import CheckpointError, ConfigError
from training.config import load_config
from training.recipe import run
from training.state import list_checkpoints
from training.testing import CONFIGS, INPUTS, write_dataset


def _cfg(tmp_path, out, extra=()):
    data = write_dataset(tmp_path / "data", "image", n=2)
    return load_config(CONFIGS / "tiny_2d_lora_cpu.yaml", [
        f"data.datasets.0.path={data}", f"data.datasets.0.image_dir={INPUTS}", "data.datasets.0.ratio=2",
        f"train.output_dir={out}", "train.micro_batch_size=1", "train.grad_accum=1", "train.scheduler=cosine",
        "train.warmup_ratio=0.2", "tune.lora.dropout=0.2", "log.progress_bar=false", "log.every=1",
        "log.loss_curve=false", *extra])


def _weights(d):
    a = load_file(str(d / "adapter_model.safetensors"))
    a.update(load_file(str(d / "trained_modules.safetensors")))
    return a


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    full = run(_cfg(tmp, tmp / "full"))                       # 4 steps, no interruption
    cfg = _cfg(tmp, tmp / "cut", ["train.save_every=1", "train.stop_after=2"])
    first = run(cfg)                                           # stops at step 2 (checkpoint written)
    second = run(cfg, resume="latest")                         # continues to the end
    return tmp, full, first, second


def test_stop_writes_a_checkpoint_and_no_final(runs):
    tmp, full, first, _ = runs
    assert full["steps"] == 4
    assert first["stopped_early"] and first["steps"] == 2 and first["final_dir"] is None
    meta = json.loads((tmp / "cut" / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert meta["global_step"] == 2 and meta["global_batch"] == 1


def test_resumed_run_equals_uninterrupted_run(runs):
    tmp, full, _, second = runs
    assert second["steps"] == 4
    a, b = _weights(tmp / "full" / "final"), _weights(tmp / "cut" / "final")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), (k, (a[k] - b[k]).abs().max())
    la = [json.loads(x)["loss"] for x in (tmp / "full" / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (tmp / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert len(la) == len(lb) == 4 and la == pytest.approx(lb, abs=1e-6)


def test_checkpoint_contents_and_pruning(runs):
    tmp, _, _, _ = runs
    ck = list_checkpoints(tmp / "cut")
    # saves at 1, 2 (then stop), 3 (after resuming); none at the last step; save_total_limit=2 keeps two
    assert [p.name for p in ck] == ["step-2", "step-3"]
    for name in ("trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng_0.pt", "trainer_state.json"):
        assert (ck[0] / name).is_file(), name
    rng = torch.load(ck[0] / "rng_0.pt", weights_only=True)
    assert set(rng) >= {"torch", "python", "numpy"}
    trainable = load_file(str(ck[0] / "trainable.safetensors"))
    assert trainable and all("lora_" in k or k.startswith("connector_image.") for k in trainable)


def test_resume_with_other_batch_or_missing_checkpoint_fails(runs, tmp_path):
    tmp, _, _, _ = runs
    with pytest.raises(ConfigError, match="global batch"):
        run(_cfg(tmp, tmp / "cut", ["train.micro_batch_size=2"]), resume=str(tmp / "cut" / "checkpoints" / "step-2"))
    with pytest.raises(CheckpointError, match="no resumable checkpoint"):
        run(_cfg(tmp, tmp_path / "empty"), resume=str(tmp_path))


_KILLER = """
import os, signal, sys
import training.recipe as r
orig = r.Recipe._micro_step
def micro_step(self, *a, **k):
    if self.step == 2:  # in the middle of step 3, after the step-2 checkpoint: no clean-up of any kind
        os.kill(os.getpid(), signal.SIGKILL)
    return orig(self, *a, **k)
r.Recipe._micro_step = micro_step
from training.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_mid_step_then_resume_equals_uninterrupted(runs, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from training.testing import REPO_ROOT

    tmp, _, _, _ = runs
    cfg_args = ["--config", str(CONFIGS / "tiny_2d_lora_cpu.yaml"),
                f"data.datasets.0.path={tmp / 'data' / 'image_2.json'}", f"data.datasets.0.image_dir={INPUTS}",
                "data.datasets.0.ratio=2", f"train.output_dir={tmp_path / 'killed'}", "train.micro_batch_size=1",
                "train.grad_accum=1", "train.scheduler=cosine", "train.warmup_ratio=0.2", "tune.lora.dropout=0.2",
                "log.progress_bar=false", "log.every=1", "log.loss_curve=false", "train.save_every=1"]
    # same thread count as this process: float reductions in the same order
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONPATH=str(REPO_ROOT))
    proc = subprocess.run([sys.executable, "-c", _KILLER, *cfg_args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [p.name for p in list_checkpoints(tmp_path / "killed")] == ["step-1", "step-2"]
    assert not (tmp_path / "killed" / "final").exists()
    result = run(_cfg(tmp, tmp_path / "killed", ["train.save_every=1"]), resume="latest")
    assert result["steps"] == 4
    a, b = _weights(tmp / "full" / "final"), _weights(tmp_path / "killed" / "final")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), (k, (a[k] - b[k]).abs().max())
