"""The shipped demo checkpoint (Resources/demo_model): format, size, and answers on unseen phantoms."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

DEMO = Path(__file__).resolve().parents[1] / "Resources" / "demo_model"


def test_demo_checkpoint_is_small_and_self_contained():
    assert (DEMO / "config.json").is_file(), "Resources/demo_model is missing; see docs/readme/demo.md"
    size = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert size <= 20 * 2**20, size
    assert not list(DEMO.glob("*.bin")) and not list(DEMO.glob("*.pt")) and not list(DEMO.glob("*.pkl"))
    cfg = json.loads((DEMO / "config.json").read_text())
    assert cfg["model_type"] == "medmvl"
    spec = cfg["preprocessing"]["image3d"]
    assert spec["size"] == [32, 64, 64] and spec["crop_foreground"] is False


def test_demo_model_answers_unseen_phantoms():
    """Closed questions about test-split phantoms (never trained on), by generation, as the benchmark."""
    import torch

    from medmvl_core.data.phantom_dataset import format_box_3d, model_box_fn
    from medmvl_core.data.phantom_tasks import make_tasks, parse_yes_no
    from medmvl_core.data.phantoms import make_ct_phantom
    from medmvl_core.imaging import Volume
    from medmvl_core.model import load_checkpoint

    model, proc = load_checkpoint(DEMO)
    hits = []
    for index in range(8):
        ph = make_ct_phantom(0, "test", 100 + index)
        vol = Volume(array=ph.array, spacing=ph.spacing, origin=ph.origin,
                     direction=np.asarray(ph.direction).reshape(3, 3), modality="CT", source="phantom")
        tasks = make_tasks(ph, np.random.default_rng(index), model_box_fn(ph, None), format_box_3d)
        for t in (t for t in tasks if t["task"] == "closed"):
            s = proc([{"from": "human", "value": "<image3d>\n" + t["question"]}], image3d=vol, mode="generate")
            with torch.no_grad():
                out = model.generate(input_ids=s["input_ids"][None], attention_mask=s["attention_mask"][None],
                                     images3d=s["images3d"], max_new_tokens=6, do_sample=False,
                                     pad_token_id=proc.tokenizer.pad_token_id,
                                     eos_token_id=proc.tokenizer.eos_token_id)
            hits.append(parse_yes_no(proc.batch_decode(out)[0]) == t["truth"]["yes"])
    assert np.mean(hits) >= THRESHOLD, (np.mean(hits), len(hits))


THRESHOLD = 0.75
