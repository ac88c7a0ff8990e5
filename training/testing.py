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
