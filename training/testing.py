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
