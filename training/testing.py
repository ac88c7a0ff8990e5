"""Helpers for the training tests and smoke runs: small MedM-VL JSON data sets built from the
reference fixture's images (distinct rows, so that batches differ between processes)."""

from __future__ import annotations

import json
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
REFERENCE = REPO_ROOT / "Testing" / "data" / "medmvl_reference"
INPUTS = REFERENCE / "inputs"
CONFIGS = REPO_ROOT / "training" / "configs"

_ANSWERS = [
    "No, there is no pleural effusion.",
    "Yes, a small right pleural effusion is seen.",
    "The heart size is normal.",
    "A 6 mm nodule is seen in the right upper lobe.",
    "There is no pneumothorax.",
    "The lungs are clear.",
]
_QUESTIONS = ["Is there any pleural effusion?", "Describe the heart.", "Is there a nodule?", "Any pneumothorax?"]


def write_dataset(folder: Path, kind: str = "image", n: int = 4) -> Path:
    """A JSON file of ``n`` distinct rows over the fixture's two X-rays (``kind="image"``) or two CTs."""
    files = ["cxr.png", "cxr_b.png"] if kind == "image" else ["ct_volume.npy", "ct_volume_b.npy"]
    ph = "<image>" if kind == "image" else "<image3d>"
    rows = []
    for i in range(n):
        rows.append({"id": f"{kind}_{i}",
                     "conversations": [{"from": "human", "value": f"{ph}\n{_QUESTIONS[i % len(_QUESTIONS)]}"},
                                       {"from": "gpt", "value": _ANSWERS[i % len(_ANSWERS)]}],
                     kind: [files[i % 2]]})
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{kind}_{n}.json"
    path.write_text(json.dumps(rows, indent=1))
    return path


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a rendezvous."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(accelerate_config: Path, args: list, timeout: float = 300, env: dict | None = None):
    """``accelerate launch --config_file CONFIG -m training.cli ARGS`` on 127.0.0.1 with a free port;
    returns the CompletedProcess (stdout/stderr captured as text)."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config),
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()), "-m", "training.cli", *args]
    full_env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT), **(env or {}))
    return subprocess.run(cmd, cwd=REPO_ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def losses(run_dir: Path, key: str = "loss") -> list[float]:
    """The logged ``key`` of every train step of a run (metrics.jsonl)."""
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if r.get("split", "train") == "train" and key in r]


def run_overrides(data: Path, ratio: int, steps: int) -> list[str]:
    """Config overrides of the multi-process tests: ``data`` at ``ratio``, micro-batch 1, ``steps``
    steps, a loss per step in metrics.jsonl, nothing else written during the run."""
    return [f"data.datasets.0.path={data}", f"data.datasets.0.image_dir={INPUTS}", f"data.datasets.0.ratio={ratio}",
            "train.micro_batch_size=1", f"train.max_steps={steps}", "log.progress_bar=false", "log.every=1",
            "log.loss_curve=false", "log.tensorboard=false", "train.save_every=0"]


def assert_close_rel(a: list[float], b: list[float], rel: float = 1e-5) -> None:
    """Same length and each value of ``a`` within ``rel`` (relative) of ``b``'s."""
    assert len(a) == len(b), (a, b)
    for x, y in zip(a, b):
        assert abs(x - y) <= rel * abs(y), (a, b)



def assert_same_adapter(run_a: Path, run_b: Path, atol: float = 1e-5) -> None:
    """The LoRA adapters two runs saved (``final/adapter_model.safetensors``) hold the same tensors,
    equal within ``atol``."""
    import torch
    from safetensors.torch import load_file

    wa = load_file(str(run_a / "final" / "adapter_model.safetensors"))
    wb = load_file(str(run_b / "final" / "adapter_model.safetensors"))
    assert set(wa) == set(wb) and wa
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=atol), k


SBATCH = REPO_ROOT / "training" / "slurm" / "launch.sbatch"
_FAKE_SRUN = """#!/bin/bash
# stand-in for srun: the task once per node on this machine, as SLURM would start it on each node
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((n = 0; n < SLURM_NNODES; n++)); do SLURM_NODEID=$n SLURM_PROCID=$n "$@" & pids+=($!); done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""


def sbatch_locally(workdir: Path, args: list, nodes: int = 2, background: bool = False, timeout: float = 400,
                   extra_env: dict | None = None):
    """Run ``training/slurm/launch.sbatch ARGS`` as ``nodes`` nodes on this machine: ``srun`` and
    ``scontrol`` are stand-ins (the task once per node with SLURM_NODEID = 0..nodes-1; the first host
    is 127.0.0.1), so the script's own rendezvous logic runs. One process per node. Returns the
    CompletedProcess, or the Popen with ``background=True``."""
    import os
    import subprocess
    import sys

    fake = Path(workdir) / "fakebin"
    fake.mkdir(parents=True, exist_ok=True)
    (fake / "srun").write_text(_FAKE_SRUN)
    (fake / "scontrol").write_text("#!/bin/bash\necho 127.0.0.1\n")  # `scontrol show hostnames LIST`
    for f in ("srun", "scontrol"):
        (fake / f).chmod(0o755)
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", SLURM_NNODES=str(nodes),
               SLURM_JOB_NODELIST=f"node[1-{nodes}]", GPUS_PER_NODE="1", MASTER_PORT=str(free_port()),
               PYTHON=sys.executable, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT), **(extra_env or {}))
    cmd = ["bash", str(SBATCH), *args]
    if background:
        return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
