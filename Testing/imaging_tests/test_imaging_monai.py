"""Our MONAI-free transforms equal MONAI's and transformers' on random inputs (MONAI is test-only)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from medmvl_core.imaging import default_spec, preprocess
from medmvl_core.imaging import transforms as T

mtf = pytest.importorskip("monai.transforms")


def _monai_ct(hu: np.ndarray, size) -> np.ndarray:
    """MedM-VL HEAD's CT path up to the uint8 cast, with MONAI (window in float64, as for int16 HU)."""
    x = (np.clip(hu.astype(np.float64), -1000, 1000) + 1000) / 2000 * 255
    x = mtf.CropForeground()(x[None])
    x = mtf.Resize(spatial_size=list(size), mode="bilinear")(x)
    return mtf.ToTensor(dtype=torch.float)(x).as_tensor()[0].numpy()


def _random_ct(rng, shape, dtype=np.int16):
    hu = np.full(shape, -1000, dtype=np.float64)
    lo = [int(rng.integers(0, max(1, n // 3))) for n in shape]
    hi = [int(rng.integers(max(l + 1, 2 * n // 3), n + 1)) for l, n in zip(lo, shape)]
    region = tuple(slice(a, b) for a, b in zip(lo, hi))
    hu[region] = rng.uniform(-1200, 1500, size=[b - a for a, b in zip(lo, hi)])
    return hu.astype(dtype) if dtype != np.float64 else hu


@pytest.mark.parametrize("seed", range(6))
def test_crop_resize_equal_monai_random(seed):
    rng = np.random.default_rng(seed)
    shape = tuple(int(v) for v in rng.integers(3, 70, size=3))
    size = tuple(int(v) for v in rng.integers(2, 48, size=3))
    dtype = [np.int16, np.float64, np.float32][seed % 3]
    hu = _random_ct(rng, shape, dtype)
    ref = _monai_ct(hu, size)
    fn = lambda v: T.window_to_255(v, -1000, 1000)  # noqa: E731
    box = T.foreground_box(hu, fn)
    ours = T.resize_trilinear(hu, size, fn, box)
    assert ours.shape == ref.shape and ours.dtype == np.float32
    assert np.abs(ours - ref).max() <= 3.1e-5  # at most one float32 ulp at 255 ...
    assert np.array_equal(ours, ref)  # ... and in fact bitwise on x86-64 (torch's FMA order reproduced)
    assert np.array_equal(ours.astype(np.uint8), ref.astype(np.uint8))


def test_resize_bitwise_equal_torch_on_this_machine():
    rng = np.random.default_rng(1)
    x = rng.uniform(0, 255, size=(37, 29, 53)).astype(np.float32)
    x[:, :6] = 255.0  # flat regions where a different rounding would show after truncation
    for size in [(32, 32, 32), (32, 64, 20), (5, 7, 9), (37, 29, 53)]:
        ref = torch.nn.functional.interpolate(torch.from_numpy(x)[None, None], size=size, mode="trilinear",
                                              align_corners=False)[0, 0].numpy()
        ours = T.resize_trilinear(x, size)
        assert np.abs(ours - ref).max() <= 3.1e-5
        assert np.array_equal(ours, ref)


def test_same_size_skips_interpolation_like_monai():
    rng = np.random.default_rng(2)
    hu = _random_ct(rng, (8, 9, 10))
    fn = lambda v: T.window_to_255(v, -1000, 1000)  # noqa: E731
    box = T.foreground_box(hu, fn)
    size = tuple(b - a for a, b in box)
    np.testing.assert_array_equal(T.resize_trilinear(hu, size, fn, box), _monai_ct(hu, size))


def test_foreground_box_equals_monai_and_none_when_empty():
    rng = np.random.default_rng(3)
    for _ in range(5):
        x = np.zeros(tuple(int(v) for v in rng.integers(2, 30, size=3)))
        pts = rng.integers(0, x.shape, size=(3, 3))
        x[tuple(pts.T)] = 1.0
        crop = mtf.CropForeground()
        start, end = crop.compute_bounding_box(x[None])
        assert [tuple(v) for v in zip(start, end)] == list(T.foreground_box(x))
    assert T.foreground_box(np.full((4, 4, 4), -1000, np.int16),
                            lambda v: T.window_to_255(v, -1000, 1000)) is None


@pytest.mark.parametrize("normalize,monai_pre", [
    ({"type": "mean_std", "mean": 55.6982188356434, "std": 66.1943479570918}, "mean_std"),
    ({"type": "minmax"}, "minmax"),
])
def test_medmclip_and_minmax_paths_equal_monai(normalize, monai_pre):
    rng = np.random.default_rng(4)
    hu = _random_ct(rng, (20, 30, 25))
    spec = {"kind": "volume", "hu_window": [-1000, 1000], "crop_foreground": True, "size": [8, 16, 12],
            "cast_uint8": False, "channels": 1, "orientation": "native", "normalize": normalize}
    ours, _ = preprocess(hu, spec)
    x = (np.clip(hu, -1000, 1000) + 1000) / 2000 * 255
    if monai_pre == "mean_std":
        x = (x - normalize["mean"]) / normalize["std"]  # MedM-CLIP's Image3DProcessor
    else:
        x = (x - x.min()) / (x.max() - x.min())
    x = mtf.Resize(spatial_size=[8, 16, 12], mode="bilinear")(mtf.CropForeground()(x[None]))
    ref = mtf.ToTensor(dtype=torch.float)(x).as_tensor().numpy()
    assert ours.shape == ref.shape == (1, 8, 16, 12)
    assert np.abs(ours - ref).max() <= 1e-5


def test_slices_processor_equals_siglip_processor():
    from transformers import SiglipImageProcessor

    rng = np.random.default_rng(5)
    vol = rng.integers(0, 256, size=(4, 24, 24), dtype=np.uint8)
    norm = default_spec("siglip_slices", 24)["normalize"]
    proc = SiglipImageProcessor(size={"height": 24, "width": 24}, resample=3, rescale_factor=1 / 255,
                                image_mean=[0.5] * 3, image_std=[0.5] * 3)
    x = torch.from_numpy(vol)[:, None].expand(-1, 3, -1, -1)
    ref = proc(x, return_tensors="pt")["pixel_values"].permute(1, 0, 2, 3).numpy()
    ours = T.slices_image_processor(vol, norm)
    assert np.abs(ours - ref).max() <= 1e-6
    # a different size goes through PIL bicubic per slice, as the processor does
    norm16 = dict(norm, image_size=16)
    proc16 = SiglipImageProcessor(size={"height": 16, "width": 16}, resample=3, rescale_factor=1 / 255,
                                  image_mean=[0.5] * 3, image_std=[0.5] * 3)
    ref16 = proc16(x, return_tensors="pt")["pixel_values"].permute(1, 0, 2, 3).numpy()
    assert np.abs(T.slices_image_processor(vol, norm16) - ref16).max() <= 1e-6


@pytest.mark.parametrize("hw", [(40, 52), (64, 64), (17, 90)])
def test_2d_equals_hf_processors(hw):
    from PIL import Image
    from transformers import CLIPImageProcessor, SiglipImageProcessor

    rng = np.random.default_rng(hw[0])
    rgb = rng.integers(0, 256, size=hw + (3,), dtype=np.uint8)
    sig = SiglipImageProcessor(size={"height": 32, "width": 32}, resample=3, rescale_factor=1 / 255,
                               image_mean=[0.5] * 3, image_std=[0.5] * 3)
    ours, _ = preprocess(rgb, default_spec("siglip", 32))
    ref = sig(Image.fromarray(rgb), return_tensors="np")["pixel_values"][0]
    assert np.abs(ours - ref).max() <= 1e-6
    clip = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    ours_c, geom = preprocess(rgb, default_spec("clip", 28))
    ref_c = clip(Image.fromarray(rgb), return_tensors="np")["pixel_values"][0]
    assert ours_c.shape == ref_c.shape == (3, 28, 28)
    assert np.abs(ours_c - ref_c).max() <= 1e-6
    # the centre crop is in the geometry: the model's x extent covers only part of a wide image
    assert geom.region_extent[1] <= hw[0] + 1e-9 and geom.region_extent[2] <= hw[1] + 1e-9
    grey = rgb[..., 0]
    ours_g, _ = preprocess(grey, default_spec("siglip", 32))
    ref_g = sig(Image.fromarray(grey).convert("RGB"), return_tensors="np")["pixel_values"][0]
    assert np.abs(ours_g - ref_g).max() <= 1e-6


def test_runtime_imports_neither_monai_nor_torch():
    code = ("import sys; from medmvl_core.imaging import read_image, preprocess, default_spec; "
            "import numpy as np; preprocess(np.full((8, 8, 8), 100, np.int16), default_spec('siglip_slices', 8)); "
            "print('monai' in sys.modules, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("shape,size", [((64, 96, 96), (32, 64, 64)), ((7, 10, 13), (3, 4, 5)),
                                        ((5, 6, 7), (8, 6, 3))])
def test_window_max_resize_equals_torch_adaptive_max_pool(shape, size):
    rng = np.random.default_rng(3)
    x = rng.normal(0, 400, shape).astype(np.float32)
    box = [(1, shape[0]), (0, shape[1] - 1), (2, shape[2])]
    got = T.resize_window_max(x, size, -160.0, 240.0, box)
    crop = torch.from_numpy(x[1:, :-1, 2:].astype(np.float64))
    ref = torch.nn.functional.adaptive_max_pool3d(crop[None, None], size)[0, 0]
    ref = ((ref.clamp(-160.0, 240.0) + 160.0) / 400.0).float().numpy()
    assert got.shape == tuple(size) and got.dtype == np.float32
    np.testing.assert_array_equal(got, ref)


def test_max_windows_keep_a_small_dense_finding_that_averaging_loses():
    vol = np.full((64, 96, 96), -850.0, np.float32)  # lung
    vol[31:33, 41:43, 51:53] = 1000.0                # a calcification 2 voxels wide
    spec = {"kind": "volume", "hu_window": [-160, 240], "crop_foreground": False, "size": [32, 64, 64],
            "orientation": "native", "channels": 1, "normalize": {"type": "minmax"},
            "max_windows": [[130, 1130]]}
    out, _ = preprocess(vol, spec)
    assert out.shape == (2, 32, 64, 64)
    assert out[1].max() == pytest.approx(0.87) and out[1][out[1] > 0].size < 20
    assert out[0].max() < 0.4  # the trilinear channel averages it with the lung
    assert np.argwhere(out[1] == out[1].max()).min(0).tolist()[0] in (15, 16)
    from medmvl_core.imaging import validate_spec
    from medmvl_core.errors import ConfigError
    with pytest.raises(ConfigError, match="max_windows"):
        validate_spec(dict(spec, max_windows=[[5, 1]]))
