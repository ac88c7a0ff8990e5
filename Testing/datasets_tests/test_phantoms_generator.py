"""Phantom generator: determinism, splits, geometry on disk, findings really drawn, annotations."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medmvl_core.data.phantom_dataset import generate_dataset, model_box_fn
from medmvl_core.data.phantom_tasks import LOBES, make_tasks, parse_kind, parse_report, report_text
from medmvl_core.data.phantoms import (CT_SHAPE, HU, Finding, make_ct_phantom, make_phantom, make_xray_phantom,
                                       write_phantom)
from medmvl_core.errors import DataError


def test_same_seed_same_phantom_and_splits_differ():
    a, b = make_ct_phantom(3, "train", 5), make_ct_phantom(3, "train", 5)
    np.testing.assert_array_equal(a.array, b.array)
    assert a.truth() == b.truth()
    t = make_ct_phantom(3, "test", 5)
    assert t.id != a.id
    assert not np.array_equal(t.array, a.array)
    assert not np.array_equal(make_ct_phantom(4, "train", 5).array, a.array)


def test_ct_anatomy_and_findings_are_in_the_volume():
    kinds_seen = set()
    for index in range(12):
        ph = make_ct_phantom(0, "train", index)
        assert ph.array.shape == CT_SHAPE and ph.array.dtype == np.float32
        assert ph.array.min() >= -1100 and (ph.array < -700).any()  # air and lung present
        assert len(ph.findings) <= 2 and len({f.kind for f in ph.findings}) == len(ph.findings)
        for f in ph.findings:
            kinds_seen.add(f.kind)
            k1, j1, i1, k2, j2, i2 = f.box
            assert 0 <= k1 < k2 <= CT_SHAPE[0] and 0 <= j1 < j2 <= CT_SHAPE[1] and 0 <= i1 < i2 <= CT_SHAPE[2]
            center = ph.array[(k1 + k2) // 2, (j1 + j2) // 2, (i1 + i2) // 2]
            if f.kind != "effusion":  # convex lesions: the box centre is the lesion, within noise
                assert abs(center - HU[f.kind]) < 80, (f, center)
            side = f.location.split()[0]
            if side in ("right", "left"):  # patient's right is at low i (LPS, identity direction)
                assert ((i1 + i2) / 2 < CT_SHAPE[2] / 2) == (side == "right"), f
    assert len(kinds_seen) >= 3


def test_xray_is_uint8_and_findings_stand_out():
    ph = make_xray_phantom(0, "val", 2)
    assert ph.array.dtype == np.uint8 and ph.array.shape == (128, 128)
    for index in range(10):
        ph = make_xray_phantom(0, "val", index)
        for f in ph.findings:
            if f.kind in ("nodule", "mass", "calcification"):
                j1, i1, j2, i2 = f.box
                inside = ph.array[(j1 + j2) // 2, (i1 + i2) // 2]
                assert inside > 120, f  # lesions are bright against dark lung (~40)


def test_nifti_and_dicom_keep_geometry(tmp_path):
    import SimpleITK as sitk

    ph = make_ct_phantom(1, "test", 0)
    name = write_phantom(ph, tmp_path, dicom=True)
    img = sitk.ReadImage(str(tmp_path / name))
    np.testing.assert_allclose(img.GetSpacing(), ph.spacing)
    np.testing.assert_allclose(img.GetOrigin(), ph.origin, atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), np.round(ph.array).astype(np.int16))
    reader = sitk.ImageSeriesReader()
    files = reader.GetGDCMSeriesFileNames(str(tmp_path / f"{ph.id}_dicom"))
    assert len(files) == CT_SHAPE[0]
    reader.SetFileNames(files)
    ser = reader.Execute()
    np.testing.assert_allclose(ser.GetSpacing(), ph.spacing, atol=1e-3)
    np.testing.assert_allclose(ser.GetOrigin(), ph.origin, atol=1e-3)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ser), np.round(ph.array).astype(np.int16))


def test_report_roundtrip_and_box_mapping():
    lesions = 0
    for index in range(15):
        ph = make_ct_phantom(2, "train", index)
        text = report_text(ph.findings)
        assert parse_report(text) == {(f.kind, f.location) for f in ph.findings}
        for f in ph.findings:  # the kind is named before the size (the model commits to it first)
            if f.kind != "effusion":
                lesions += 1
                assert f"A {f.kind} measuring {f.size_mm} mm is seen in the {f.location}." in text
        fn = model_box_fn(ph, None)
        for f in ph.findings:
            box = fn(f.box)
            # no cropping: model box * input-array shape gives the voxel edges back
            back = [round(v * n) for v, n in zip(box, CT_SHAPE * 2)]
            assert back == list(f.box)
    assert lesions > 3


def test_report_goes_organ_by_organ():
    cyst = Finding("cyst", "liver", size_mm=35)
    eff = Finding("effusion", "left pleural space", grade="small")
    calc = Finding("calcification", "right lower lobe", size_mm=15)
    text = report_text([cyst, eff, calc])  # in any order: lungs, pleura, liver, heart
    order = [text.index(s) for s in ("A calcification measuring 15 mm is seen in the right lower lobe.",
                                     "A small left pleural effusion is seen.",
                                     "A cyst measuring 35 mm is seen in the liver.", "The heart size is normal.",
                                     "Impression: Calcification in the right lower lobe; small left pleural "
                                     "effusion; cyst in the liver.")]
    assert order == sorted(order)
    text = report_text([cyst])  # the normal organs keep their places around the finding
    assert text.index("The lungs are clear.") < text.index("No pleural effusion") < text.index("A cyst") \
        < text.index("The heart")
    assert "The liver is normal." not in text and "The liver is normal." in report_text([calc])
    assert parse_report(report_text([cyst, eff, calc])) == {("cyst", "liver"), ("effusion", "left pleural space"),
                                                           ("calcification", "right lower lobe")}


def test_region_answers_name_the_place_first():
    """Region answers (generator version 4): "In the <place>: <what>." — for a normal box, the lobe
    it was drawn in, which the phantom records; parse_kind reads the kind back."""
    seen = set()
    for index in range(12):
        ph = make_ct_phantom(3, "train", index)
        assert ph.normal_location in LOBES and ph.truth()["normal_location"] == ph.normal_location
        lo, hi = ph.normal_box[:3], ph.normal_box[3:]
        centre = tuple((a + b) // 2 for a, b in zip(lo, hi))
        assert ph.array[centre] < -500  # the normal box sits in aerated lung
        tasks = make_tasks(ph, np.random.default_rng(index), lambda b: [0.0] * 6, lambda b: "[box]")
        region = [t for t in tasks if t["task"] == "region"][0]
        kind, loc = region["truth"]["kind"], region["truth"]["location"]
        what = "normal lung" if kind == "normal" else ""
        assert region["answer"].startswith(f"In the {loc}: ") and what in region["answer"]
        assert parse_kind(region["answer"]) == kind
        if kind == "normal":
            assert loc == ph.normal_location
        seen.add(kind == "normal")
    assert seen == {True, False}


def test_generate_dataset_files(tmp_path):
    man = generate_dataset(tmp_path, {"train": 3, "test": 2}, seed=7, kind="both")
    assert len(man["phantoms"]) == 10
    train = json.loads((tmp_path / "train.json").read_text())
    tasks = json.loads((tmp_path / "test_tasks.json").read_text())
    assert {e["id"] for e in train}.isdisjoint({t["phantom"] for t in tasks})
    for e in train:
        key = "image3d" if e["id"].startswith("ct") else "image"
        assert (tmp_path / e[key][0]).is_file()
        conv = e["conversations"]
        assert conv[0]["value"].startswith("<image3d>\n" if key == "image3d" else "<image>\n")
        assert sum("<image" in t["value"] for t in conv) == 1
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        # TRAIN_CHOICES multiple-choice questions, each answered with a letter that names a present finding
        kinds = {f["kind"] for f in next(p for p in man["phantoms"] if p["id"] == e["id"])["findings"]}
        names = {"effusion": "pleural effusion"}
        choices = [(q["value"], a["value"]) for q, a in zip(conv[::2], conv[1::2]) if "(a)" in q["value"]]
        assert len(choices) == 3 and len({q for q, _ in choices}) > 1
        for q, a in choices:
            letter, named = a[1], a[4:-1]
            assert f"({letter}) {named}" in q
            assert named in ({names.get(k, k) for k in kinds} or {"no abnormality"})
    assert sum(t["task"] == "choice" for t in tasks) == len({t["phantom"] for t in tasks})  # one per phantom
    assert {t["task"] for t in tasks} >= {"report", "closed", "choice", "open", "region"}
    for t in tasks:
        if t["task"] == "choice":
            assert t["conversations"][1]["value"].startswith(f"({t['truth']['letter']})")


def test_bad_arguments_raise_typed_errors(tmp_path):
    with pytest.raises(DataError, match="unknown split"):
        make_ct_phantom(0, "holdout", 0)
    with pytest.raises(DataError, match="ct.*xray"):
        make_phantom("mri", 0, "train", 0)
    with pytest.raises(DataError, match="unknown --kind"):
        generate_dataset(tmp_path, {"train": 1}, kind="pet")


def test_cli_writes_dataset_and_tokenizer(tmp_path, capsys):
    from transformers import AutoTokenizer

    from medmvl_core.cli import main

    out = tmp_path / "ds"
    assert main(["phantoms", "--out", str(out), "--n", "4", "--n-val", "1", "--n-test", "1",
                 "--tokenizer", str(tmp_path / "tok"), "--vocab-size", "300"]) == 0
    assert (out / "val_tasks.json").is_file() and (out / "manifest.json").is_file()
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert min(tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])) >= 256
    text = "Findings: A 25 mm nodule is seen in the left upper lobe. [0.125, 0.5, 0.75, 0.875, 1.0, 0.0]"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert main(["phantoms", "--out", str(out), "--splits", "train,holdout"]) == 1
    assert "unknown split" in capsys.readouterr().err


def test_empty_splits_still_write_their_files(tmp_path):
    """``medmvl phantoms --n 0 --n-val 0 --n-test 1`` (a few test images to try a model on) used to
    crash writing train.json into a folder that nothing had created."""
    from medmvl_core.data.phantom_dataset import generate_dataset

    generate_dataset(tmp_path / "new", {"train": 0, "test": 1}, seed=0, kind="xray")
    assert json.loads((tmp_path / "new" / "train.json").read_text()) == []
    assert (tmp_path / "new" / "images" / "xr-test-00000.png").is_file()
