"""Parity with the MedM-VL reference fixture: every intermediate of the CT path and the 2D path."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medmvl_core.imaging import default_spec, preprocess, read_image, spec_from_checkpoint
from medmvl_core.imaging import transforms as T
from medmvl_core.imaging.transforms import AugmentParams

TOL = 1e-5


def _golden(reference_dir, ckpt):
    return json.loads((reference_dir / ckpt / "golden.json").read_text())


def _ct_samples(reference_dir):
    g = _golden(reference_dir, "ct_chest_tiny")
    inputs = json.loads((reference_dir / "inputs" / "ct_inference.json").read_text())
    return [(s, reference_dir / "inputs" / inputs[s["json_index"]]["image3d"][0]) for s in g["inference_samples"]]


def test_ct_intermediates_match_golden(reference_dir):
    for sample, path in _ct_samples(reference_dir):
        vol = read_image(path)
        assert vol.array.dtype == np.int16 and list(vol.array.shape) == sample["hu_npy_shape"]
        fn = lambda v: T.window_to_255(v, -1000, 1000)  # noqa: E731
        box = T.foreground_box(vol.array, fn)
        assert [list(b) for b in box] == sample["crop_foreground_box_DHW"]
        assert [b - a for a, b in box] == sample["cropped_shape"]
        resized = T.resize_trilinear(vol.array, (32, 32, 32), fn, box)
        gold_f = np.load(reference_dir / sample["resized_float_npy"]).reshape(resized.shape)
        assert np.abs(resized - gold_f).max() <= TOL
        gold_u8 = np.load(reference_dir / sample["resized_uint8_npy"]).reshape(resized.shape)
        assert np.array_equal(resized.astype(np.uint8), gold_u8)


def test_ct_model_tensor_and_geometry(reference_dir):
    spec = spec_from_checkpoint(reference_dir / "ct_chest_tiny", "image3d")
    assert spec["size"] == [32, 32, 32] and spec["normalize"]["image_size"] == 32
    for sample, path in _ct_samples(reference_dir):
        tensor, geom = preprocess(path, spec)
        gold = np.load(reference_dir / sample["image_tensor_npy"])
        assert tensor.shape == tuple(sample["image_tensor_shape"]) and tensor.dtype == np.float32
        assert np.abs(tensor - gold).max() <= TOL
        assert geom.crop_box == sample["crop_foreground_box_DHW"]
        assert geom.model_shape == (32, 32, 32)


def test_default_spec_equals_checkpoint_spec_for_ct(reference_dir):
    spec = spec_from_checkpoint(reference_dir / "ct_chest_tiny", "image3d")
    assert default_spec("siglip_slices", 32) == spec


def test_2d_image_tensors(reference_dir):
    g = _golden(reference_dir, "2d_tiny")
    inputs = json.loads((reference_dir / "inputs" / "cxr_inference.json").read_text())
    spec = spec_from_checkpoint(reference_dir / "2d_tiny", "image")
    assert spec["kind"] == "image"
    for sample in g["inference_samples"]:
        path = reference_dir / "inputs" / inputs[sample["json_index"]]["image"][0]
        tensor, geom = preprocess(path, spec)
        gold = np.load(reference_dir / sample["image_tensor_npy"])
        assert tensor.shape == gold.shape == (3, 32, 32)
        assert np.abs(tensor - gold).max() <= TOL
        assert geom.kind == "image" and geom.source_shape == (1, 52, 40)  # PIL size (40, 52) is (W, H)
    train = np.load(reference_dir / g["train_sample"]["image_tensor_npy"])
    finetune = json.loads((reference_dir / "inputs" / "cxr_finetune.json").read_text())
    tensor, _ = preprocess(reference_dir / "inputs" / finetune[0]["image"][0], spec)
    assert np.abs(tensor - train).max() <= TOL  # 2D has no train-mode augmentation


def test_v1_preprocessed_volumes(reference_dir):
    """v1.0: the .npy is already [1, 32, H, W] in [0, 255]; cast to uint8 and SigLIP per slice."""
    spec = spec_from_checkpoint(reference_dir / "ct_chest_tiny_v1_schema", "image3d")
    assert spec["kind"] == "volume_preprocessed"
    g = _golden(reference_dir, "ct_chest_tiny_v1_schema")
    inputs = json.loads((reference_dir / "inputs" / "ct_inference_v1.json").read_text())
    for sample in g["inference_samples"]:
        path = reference_dir / "inputs" / inputs[sample["json_index"]]["image3d"][0]
        tensor, geom = preprocess(path, spec)
        gold = np.load(reference_dir / sample["image_tensor_npy"])
        assert np.abs(tensor - gold).max() <= TOL
        assert geom.kind == "volume_preprocessed"


@pytest.mark.parametrize("ckpt", ["ct_chest_tiny", "ct_chest_tiny_v1_schema"])
def test_train_augmentation_reproduces_recorded_draw(reference_dir, ckpt):
    g = _golden(reference_dir, ckpt)["train_sample"]
    aug = g["augmentation"]
    params = AugmentParams(aug["rand_rotate90"]["k"] if aug["rand_rotate90"]["applied"] else 0,
                           aug["rand_flip_spatial_axis0"], aug["rand_flip_spatial_axis1"],
                           aug["rand_flip_spatial_axis2"])
    finetune = json.loads((reference_dir / "inputs" / g["json"].split("/")[-1]).read_text())
    spec = spec_from_checkpoint(reference_dir / ckpt, "image3d")
    tensor, geom = preprocess(reference_dir / "inputs" / finetune[0]["image3d"][0], spec, augment=params)
    gold = np.load(reference_dir / g["image_tensor_npy"])
    assert np.abs(tensor - gold).max() <= TOL
    assert geom.augment == params.__dict__
    eval_tensor, _ = preprocess(reference_dir / "inputs" / finetune[0]["image3d"][0], spec)
    assert not np.array_equal(eval_tensor, gold)  # the augmentation really changed the tensor


def test_draw_augment_is_seeded_and_has_medmvl_rates():
    a = [T.draw_augment(np.random.default_rng(7)) for _ in range(2)]
    assert a[0] == a[1]
    draws = [T.draw_augment(np.random.default_rng(s)) for s in range(2000)]
    rot = np.mean([d.k > 0 for d in draws])
    flips = np.mean([d.flip_d for d in draws])
    assert 0.45 < rot < 0.55 and 0.07 < flips < 0.13
    assert {d.k for d in draws} == {0, 1, 2, 3}
