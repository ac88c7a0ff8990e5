"""``preprocess(vol, spec, roi)``: a Volume (or path / array) -> the exact model input tensor.

The steps for ``kind="volume"`` (MedM-VL HEAD, eval mode) are, in order: reorientation
(``orientation``), ROI crop (optional), intensity (``hu_window`` -> [0, 255] float64; then
``minmax`` / ``mean_std`` when those are the normalisation, as M3D-CLIP and MedM-CLIP do
before cropping), foreground crop (MONAI CropForeground, value > 0), trilinear resize to
``size`` (float32), uint8 truncation (``cast_uint8``), channel copies, and the per-slice HF
image processor for ``normalize.type == "image_processor"``; then one channel per
``max_windows`` entry (the same region, windowed to [lo, hi] -> [0, 1] and resized by area
maximum; not a MedM-VL step — our own encoders use it to keep small dense findings). The optional ``augment``
reproduces the train-mode rot90/flip, seeded.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from medmvl_core.errors import InvalidImageError, RoiError
from medmvl_core.imaging import transforms as T
from medmvl_core.imaging.geometry import GeometryRecord
from medmvl_core.imaging.orientation import Reorientation, reorient
from medmvl_core.imaging.spec import validate_spec
from medmvl_core.imaging.volume import Volume, as_volume

logger = logging.getLogger(__name__)

MAX_VOXELS = 1 << 31          # 2.1 G voxels: 4 GB as int16, far beyond any CT
MAX_DIM = 16384


def validate_volume(vol: Volume) -> Volume:
    """Reject arrays a model cannot take: empty, absurdly large, 4D, non-finite. Returns ``vol``."""
    a = vol.array
    if a.ndim not in (3, 4) or (a.ndim == 4 and a.shape[-1] != 3):
        raise InvalidImageError(
            f"expected a 3D volume [K, J, I] or a 2D image, got an array of shape {a.shape}; "
            "4D or multi-component data (time series, vectors) must be split into 3D volumes first")
    if a.size == 0 or min(a.shape[:3]) < 1:
        raise InvalidImageError(f"the image is empty (shape {a.shape}); check the file")
    if a.size > MAX_VOXELS or max(a.shape[:3]) > MAX_DIM:
        raise InvalidImageError(
            f"the image is implausibly large (shape {a.shape}, {a.size} voxels; limits "
            f"{MAX_DIM} per axis, {MAX_VOXELS} in total); crop or downsample it first")
    if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_) or np.iscomplexobj(a):
        raise InvalidImageError(f"voxel type {a.dtype} is not a real number type")
    if np.issubdtype(a.dtype, np.floating):
        bad = ~np.isfinite(a)
        if bad.any():
            raise InvalidImageError(
                f"the image has {int(bad.sum())} NaN/inf voxels; replace them (e.g. with the "
                "background value) before preprocessing")
    return vol


def _load(x) -> Volume:
    if isinstance(x, (str, Path)):
        from medmvl_core.imaging.readers import read_image

        return read_image(x)
    return as_volume(x)


def preprocess(vol, spec: dict, roi: Sequence[int] | None = None, *, margin: int = 0,
               augment: T.AugmentParams | None = None) -> tuple[np.ndarray, GeometryRecord]:
    """Turn an image into the model input tensor exactly as MedM-VL does.

    Args:
        vol: a :class:`Volume`, a path (any supported format) or an array ([D, H, W] HU
            volume, [H, W] / [H, W, 3] image; arrays get identity geometry).
        spec: preprocessing spec (see :mod:`medmvl_core.imaging.spec`).
        roi: optional voxel box ``(k1, j1, i1, k2, j2, i2)`` in the source array (half-open);
            only that region is preprocessed. 2D images use k = 0..1.
        margin: voxels added around ``roi`` on every side (clipped to the volume).
        augment: train-mode rot90/flip parameters (:func:`transforms.draw_augment`); None in eval.
    Returns:
        (tensor, geometry): float32 ``[C, D, H, W]`` for volumes, ``[3, S, S]`` for images.
    """
    spec = validate_spec(spec)
    vol = validate_volume(_load(vol))
    if spec["kind"] == "image":
        return _preprocess_image(vol, spec, roi, margin)
    if vol.is_rgb:
        raise InvalidImageError("this checkpoint takes 3D volumes but the input is a colour 2D image; "
                                "use a checkpoint for 2D images")
    if spec["kind"] == "volume_preprocessed":
        if spec.get("raw") is not None and _is_raw_scan(vol, spec):
            logger.info("the checkpoint expects v1.0-preprocessed data; this is a raw scan %s, so it goes "
                        "through the pipeline that made that data", tuple(vol.array.shape))
            return _preprocess_volume(vol, spec["raw"], roi, margin, augment)
        return _preprocess_v1(vol, spec, augment)
    return _preprocess_volume(vol, spec, roi, margin, augment)


# --------------------------------------------------------------------------- helpers
def _roi_box(roi, margin: int, shape: tuple[int, ...], plan: Reorientation | None = None) -> list[tuple[int, int]]:
    """Validate a source-voxel ROI, add the margin, clip, and map it to oriented indices."""
    try:
        r = [int(v) for v in roi]
    except (TypeError, ValueError) as exc:
        raise RoiError(f"ROI must be six integers (k1, j1, i1, k2, j2, i2), got {roi!r}") from exc
    if len(r) != 6:
        raise RoiError(f"ROI must be six integers (k1, j1, i1, k2, j2, i2), got {len(r)} values")
    if margin < 0:
        raise RoiError(f"ROI margin must be >= 0, got {margin}")
    lo, hi = np.array(r[:3]), np.array(r[3:])
    src_shape = np.array(shape[:3])
    if np.any(hi <= lo):
        raise RoiError(f"ROI {tuple(r)} is empty or inverted: each end must exceed its start")
    if np.any(hi <= 0) or np.any(lo >= src_shape):
        raise RoiError(f"ROI {tuple(r)} lies outside the volume of shape {tuple(src_shape)}; "
                       "draw the box inside the image")
    if np.any(lo < 0) or np.any(hi > src_shape):
        logger.warning("ROI extends beyond the volume; clipped to its bounds")
    lo = np.clip(lo - margin, 0, src_shape)
    hi = np.clip(hi + margin, 0, src_shape)
    if plan is not None and not plan.is_identity:
        corners = plan.from_source_edges(np.stack([lo, hi]).astype(np.float64))
        lo, hi = corners.min(axis=0), corners.max(axis=0)
    return [(int(a), int(b)) for a, b in zip(lo, hi)]


def _intensity_fn(spec: dict, arr: np.ndarray):
    """The per-voxel float64 map applied before cropping (window, then minmax/mean_std)."""
    win = spec.get("hu_window")
    norm = spec["normalize"]
    steps = []
    if win is not None:
        lo, hi = float(win[0]), float(win[1])
        steps.append(lambda v: T.window_to_255(v, lo, hi))
    if norm["type"] == "minmax":
        vmin, vmax = float(arr.min()), float(arr.max())
        if win is not None:
            vmin, vmax = (float(T.window_to_255(np.array([v]), float(win[0]), float(win[1]))[0])
                          for v in (vmin, vmax))
        if vmax <= vmin:
            raise InvalidImageError("the volume is constant; min-max normalisation is undefined")
        steps.append(lambda v: (v - vmin) / (vmax - vmin))
    elif norm["type"] == "mean_std":
        m, s = float(norm["mean"]), float(norm["std"])
        steps.append(lambda v: (v - m) / s)

    def fn(v: np.ndarray) -> np.ndarray:
        v = np.asarray(v, dtype=np.float64)
        for f in steps:
            v = f(v)
        return v
    return fn


def _finish(resized: np.ndarray, spec: dict, augment, extra: Sequence[np.ndarray] = ()) -> np.ndarray:
    """uint8 cast, channel copies, per-slice processor, ``extra`` channels (``max_windows``)
    appended, augmentation: [D,H,W] -> [C,D,H',W']."""
    norm = spec["normalize"]
    c = int(spec["channels"])
    if spec["cast_uint8"]:
        resized = resized.astype(np.uint8)  # truncation, as torch .to(uint8) for values in [0, 255]
    if norm["type"] == "image_processor":
        if resized.dtype != np.uint8:
            raise InvalidImageError("the per-slice image processor needs uint8 slices; set cast_uint8")
        out = T.slices_image_processor(resized, norm, channels=c)
    else:
        out = np.repeat(resized.astype(np.float32)[None], c, axis=0)
    if len(extra):
        out = np.concatenate([out, np.stack(extra).astype(out.dtype)], axis=0)
    if augment is not None:
        out = T.augment_volume(out, augment)
    return out


def _preprocess_volume(vol: Volume, spec: dict, roi, margin: int, augment):
    if vol.is_2d:
        raise InvalidImageError("this checkpoint takes 3D volumes but the input is a 2D image; "
                                "use a checkpoint for 2D images or pass a volume")
    src_shape = tuple(vol.array.shape)
    ovol, plan = reorient(vol, spec["orientation"])
    arr = ovol.array
    roi_box = _roi_box(roi, margin, src_shape, plan) if roi is not None else None
    if roi_box is not None:
        arr = arr[tuple(slice(a, b) for a, b in roi_box)]
    fn = _intensity_fn(spec, arr)
    if spec["crop_foreground"]:
        crop = T.foreground_box(arr, fn)
        if crop is None:
            raise InvalidImageError(
                "no foreground: every voxel is at or below the window's lower bound (e.g. all air "
                "at -1000 HU); check that the values are Hounsfield units")
    else:
        crop = tuple((0, n) for n in arr.shape)
    size = tuple(int(v) for v in spec["size"])
    resized = T.resize_trilinear(arr, size, fn, crop)
    out = _finish(resized, spec, augment, [T.resize_window_max(arr, size, float(lo), float(hi), crop)
                                           for lo, hi in spec.get("max_windows", ())])
    base = [r[0] for r in roi_box] if roi_box else [0, 0, 0]
    start = tuple(float(b + c[0]) for b, c in zip(base, crop))
    extent = tuple(float(c[1] - c[0]) for c in crop)
    geom = GeometryRecord(
        kind="volume", source_shape=src_shape, spacing=vol.spacing, origin=vol.origin,
        direction=vol.direction.tolist(), reorientation=plan, orientation=spec["orientation"],
        roi=[list(b) for b in roi_box] if roi_box else None, crop_box=[list(c) for c in crop],
        region_start=start, region_extent=extent, model_shape=size,
        augment=augment.__dict__ if augment is not None else None,
        extra=_norm_extent(spec, size))
    return out, geom


def _norm_extent(spec: dict, size) -> dict:
    """CLIP's centre crop shrinks the in-plane extent; recorded for information."""
    norm = spec["normalize"]
    if norm["type"] == "image_processor" and norm.get("crop_size"):
        start, extent = T.slices_geometry(size[1], size[2], norm)
        return {"slice_crop": {"start": start, "extent": extent}}
    return {}


def _is_raw_scan(vol: Volume, spec: dict) -> bool:
    """True when ``vol`` is not v1.0-preprocessed data: negative values (HU) or, where the spec
    names the preprocessed size, another shape."""
    a = vol.array
    shape = tuple(a.shape[1:] if a.ndim == 4 and a.shape[0] == 1 else a.shape)
    size = spec.get("size")
    if size is not None and shape != tuple(size):
        return True
    return bool(a.size) and float(np.min(a)) < 0


def _preprocess_v1(vol: Volume, spec: dict, augment):
    a = vol.array
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 3:
        raise InvalidImageError(f"v1.0 data must be [1, D, H, W] or [D, H, W], got {vol.array.shape}")
    resized = a.astype(np.float32)  # MedM-VL v1: ToTensor(float) then .to(uint8)
    out = _finish(resized, spec, augment)
    shape = tuple(int(v) for v in a.shape)
    geom = GeometryRecord(
        kind="volume_preprocessed", source_shape=shape, spacing=vol.spacing, origin=vol.origin,
        direction=vol.direction.tolist(), reorientation=Reorientation(source_shape=shape),
        orientation="native", roi=None, crop_box=None, region_start=(0.0, 0.0, 0.0),
        region_extent=tuple(float(n) for n in shape), model_shape=shape,
        augment=augment.__dict__ if augment is not None else None)
    return out, geom


def to_rgb_uint8(vol: Volume) -> np.ndarray:
    """A 2D Volume as uint8 RGB [H, W, 3], as ``PIL.Image.convert("RGB")`` gives it.

    8-bit data is used as is (grey copied to three channels). Other types (16-bit PNG/TIFF,
    float) are mapped min..max -> 0..255 and rounded; DICOM radiographs arrive already
    windowed to uint8 by the reader.
    """
    a = vol.array[0]
    if a.dtype != np.uint8:
        lo, hi = float(a.min()), float(a.max())
        scaled = (a.astype(np.float64) - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros(a.shape)
        a = np.clip(np.round(scaled), 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    return np.ascontiguousarray(a)


def _preprocess_image(vol: Volume, spec: dict, roi, margin: int):
    if vol.array.shape[0] != 1:
        raise InvalidImageError(
            f"this checkpoint takes 2D images but the input is a volume with {vol.array.shape[0]} "
            "slices; pass a single slice or use a checkpoint for 3D volumes")
    rgb = to_rgb_uint8(vol)
    src_shape = (1,) + tuple(rgb.shape[:2])
    roi_box = _roi_box(roi, margin, src_shape) if roi is not None else None
    y0 = x0 = 0
    if roi_box is not None:
        (_, _), (y0, y1), (x0, x1) = roi_box
        rgb = np.ascontiguousarray(rgb[y0:y1, x0:x1])
    out, mapping = T.image_processor(rgb, spec["normalize"])
    start = (0.0, y0 + mapping["start"][0], x0 + mapping["start"][1])
    extent = (1.0, mapping["extent"][0], mapping["extent"][1])
    geom = GeometryRecord(
        kind="image", source_shape=src_shape, spacing=vol.spacing, origin=vol.origin,
        direction=vol.direction.tolist(), reorientation=Reorientation(source_shape=src_shape),
        orientation="native", roi=[list(b) for b in roi_box] if roi_box else None, crop_box=None,
        region_start=start, region_extent=extent, model_shape=(1,) + tuple(out.shape[1:]))
    return out, geom
