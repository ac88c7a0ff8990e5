"""Writes a phantom benchmark: images, MedM-VL JSON for training, single-question items for evaluation.

Layout of ``out``::

    images/<id>.nii.gz | <id>.png   (+ images/<id>_dicom/ with ``dicom=True``)
    train.json, val.json, test.json  MedM-VL JSON: one multi-turn conversation per phantom
                                     (report, closed, choice, open, find, region), for training
    train_tasks.json, ...            one entry per question (single turn, the answer as the gpt
                                     turn) with "task", "truth" and "phantom" keys, for evaluation
    train_boxes.json, ...            the findings as model-space boxes with label and location (CT and
                                     radiographs), for dense encoder pretraining (``medmvl-train encoder``)
    manifest.json                    seed, counts, box convention, per-phantom ground truth

Image paths in the JSON are relative to ``out`` (use it as the image folder).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from medmvl_core.data.phantom_tasks import make_tasks
from medmvl_core.data.phantoms import SPLITS, Phantom, make_phantom, write_phantom
from medmvl_core.errors import DataError

logger = logging.getLogger(__name__)
# 2: reports organ by organ, the kind named before the size ("A nodule measuring 25 mm ...");
# 4: region answers name the place first ("In the right upper lobe: normal lung."; 3 was an
# experiment with multiple-choice answers, reverted).
GENERATOR_VERSION = 4


def format_box_3d(box: Iterable[float]) -> str:
    """``[z1, y1, x1, z2, y2, x2]`` with 3 decimals (medmvl_core.processing.boxes when present)."""
    try:
        from medmvl_core.processing.boxes import format_box_3d as fmt
    except ImportError:
        return "[" + ", ".join(f"{float(v):.3f}" for v in box) + "]"
    return fmt(list(box))


def format_box_2d(box: Iterable[float]) -> str:
    """``{<x1><y1><x2><y2>}`` integers 0-100 (medmvl_core.processing.boxes when present)."""
    try:
        from medmvl_core.processing.boxes import format_box_2d as fmt
    except ImportError:
        return "{" + "".join(f"<{int(round(v))}>" for v in box) + "}"
    return fmt(list(box))


def model_box_fn(ph: Phantom, spec: dict | None = None) -> Callable[[tuple[int, ...]], list[float]]:
    """Voxel/pixel box of ``ph`` -> box in the model's input space.

    3D: ``[z1, y1, x1, z2, y2, x2]`` in 0-1 (array order of the model input). With a spec that
    crops, the geometry record of :func:`medmvl_core.imaging.preprocess` maps the box; without
    cropping (the demo spec) the mapping is the voxel edges divided by the array shape, which is
    what a plain resize does. 2D: ``[x1, y1, x2, y2]`` in 0-100 of the (square, uncropped) image.
    """
    shape = ph.array.shape
    if ph.modality == "XR":
        h, w = shape[:2]
        return lambda b: [round(b[1] / w * 100), round(b[0] / h * 100), round(b[3] / w * 100),
                          round(b[2] / h * 100)]
    if spec and spec.get("crop_foreground"):
        from medmvl_core.imaging import Volume, preprocess

        vol = Volume(array=ph.array, spacing=ph.spacing, origin=ph.origin,
                     direction=np.asarray(ph.direction).reshape(3, 3), modality="CT", source="phantom")
        _, geom = preprocess(vol, spec)
        return lambda b: [round(float(v), 3) for v in geom.voxel_box_to_model(b)]
    if spec and spec.get("orientation", "native") != "native":
        raise DataError("phantom boxes support only orientation 'native' without the imaging package; "
                        "install medmvl_core.imaging or use the demo spec")
    return lambda b: unit_box_3d(b, shape, 3)


def unit_box_3d(box, shape, ndigits: int) -> list[float]:
    """Voxel box ``(k1, j1, i1, k2, j2, i2)`` of an array of ``shape`` -> 0-1 box (a plain resize)."""
    d, h, w = shape
    return [round(box[0] / d, ndigits), round(box[1] / h, ndigits), round(box[2] / w, ndigits),
            round(box[3] / d, ndigits), round(box[4] / h, ndigits), round(box[5] / w, ndigits)]


def phantom_entries(ph: Phantom, image_name: str, spec: dict | None, train: bool) -> tuple[dict, list[dict]]:
    """(multi-turn training entry, single-question evaluation items) for one phantom."""
    rng = np.random.default_rng(_stable_seed(ph.id))
    box_text = format_box_3d if ph.modality == "CT" else format_box_2d
    tasks = make_tasks(ph, rng, model_box_fn(ph, spec), box_text, train=train)
    key, tag = ("image3d", "<image3d>") if ph.modality == "CT" else ("image", "<image>")
    # Training conversations visit the tasks in a random order, so every kind of question is
    # learned both as the first turn (as evaluated) and as a follow-up (as in a worker session);
    # with data.independent_turns every turn is trained as a first turn (see training/data.py).
    order = [int(i) for i in rng.permutation(len(tasks))] if train else list(range(len(tasks)))
    conv = []
    for n, t in enumerate(tasks[i] for i in order):
        q = f"{tag}\n{t['question']}" if n == 0 else t["question"]
        conv += [{"from": "human", "value": q}, {"from": "gpt", "value": t["answer"]}]
    entry = {"id": ph.id, "conversations": conv, key: [image_name]}
    items = [{"id": f"{ph.id}-{n}", "phantom": ph.id, "task": t["task"], "truth": t["truth"] | {"answer": t["answer"]},
              "conversations": [{"from": "human", "value": f"{tag}\n{t['question']}"},
                                {"from": "gpt", "value": t["answer"]}], key: [image_name]}
             for n, t in enumerate(tasks)]
    return entry, items


def box_rows(truths: list[dict], spec: dict | None = None) -> list[dict]:
    """Box-file rows (see ``training/encoder_pretrain.py``) for the phantoms among ``truths`` (manifest
    entries): each finding's voxel box in 0-1 of the model input, with its label and location. A CT row
    names its ``image3d``; a radiograph row its ``image``, with the pixel box ``(j1, i1, j2, i2)`` as the
    one-slice box ``[0, y1, x1, 1, y2, x2]`` that a 2D convvit3d encoder (img_size [1, H, W]) learns."""
    if spec and (spec.get("crop_foreground") or spec.get("orientation", "native") not in ("native", "LPS")):
        raise DataError("box files need a spec without cropping or reorientation (the phantoms are LPS)")
    rows = []
    for t in truths:
        if t["modality"] == "CT":
            rows.append({"id": t["id"], "image3d": t["image"], "boxes": [
                {"label": f["kind"], "location": f["location"], "box": unit_box_3d(f["box"], t["shape"], 4)}
                for f in t["findings"]]})
        else:
            rows.append({"id": t["id"], "image": t["image"], "boxes": [
                {"label": f["kind"], "location": f["location"],
                 "box": unit_box_3d((0, *f["box"][:2], 1, *f["box"][2:]), (1, *t["shape"]), 4)}
                for f in t["findings"]]})
    return rows


def _stable_seed(text: str) -> int:
    import hashlib

    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def generate_dataset(out: Path, counts: dict[str, int], seed: int = 0, kind: str = "ct",
                     dicom: bool = False, spec: dict | None = None, progress: bool = False) -> dict:
    """Generate phantoms for each split in ``counts`` (e.g. {"train": 800, "test": 200}) into ``out``.

    ``kind``: "ct", "xray" or "both" (one of each per index). Returns the manifest dict.
    """
    if kind not in ("ct", "xray", "both"):
        raise DataError(f"unknown --kind {kind!r}; use ct, xray or both")
    bad = [s for s in counts if s not in SPLITS]
    if bad:
        raise DataError(f"unknown split(s) {bad}; use {list(SPLITS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)  # also when a split has no phantoms
    img_dir = out / "images"
    kinds = ["ct", "xray"] if kind == "both" else [kind]
    manifest = {"generator_version": GENERATOR_VERSION, "seed": seed, "kind": kind, "counts": counts,
                "box_format": {"3d": "[z1, y1, x1, z2, y2, x2] 0-1, model-input array order",
                               "2d": "{<x1><y1><x2><y2>} 0-100"},
                "spec": spec, "phantoms": []}
    for split, n in counts.items():
        entries, items = [], []
        it = range(n)
        if progress:
            from tqdm import tqdm

            it = tqdm(it, desc=split, unit="phantom")
        for index in it:
            for k in kinds:
                ph = make_phantom(k, seed, split, index)
                name = write_phantom(ph, img_dir, dicom=dicom)
                entry, its = phantom_entries(ph, f"images/{name}", spec, train=(split == "train"))
                entries.append(entry)
                items += its
                manifest["phantoms"].append(ph.truth() | {"image": f"images/{name}"})
        (out / f"{split}.json").write_text(json.dumps(entries, indent=1))
        (out / f"{split}_boxes.json").write_text(json.dumps(box_rows(
            [p for p in manifest["phantoms"] if p["split"] == split], spec), indent=1))
        (out / f"{split}_tasks.json").write_text(json.dumps(items, indent=1))
        logger.info("wrote %d %s phantoms (%d questions)", len(entries), split, len(items))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest
