"""Intensity and spatial transforms that reproduce MedM-VL's preprocessing exactly, without MONAI.

* :func:`foreground_box` — MONAI ``CropForeground`` (``select_fn`` = value > 0, margin 0,
  ``allow_smaller=True``): the half-open bounding box of the positive voxels.
* :func:`resize_trilinear` — MONAI ``Resize(mode="bilinear"/"trilinear")`` = torch
  ``interpolate(mode="trilinear", align_corners=False)`` in float32 without anti-aliasing.
  It is computed separably (W, then H, then D) with the same float32 source indices and
  weights and the same fused multiply-add order as torch's CPU kernel, so results are
  bit-identical to torch on x86-64 builds with FMA (and within one float32 ulp elsewhere).
  Only the voxels the interpolation touches are read, so a 512x512x300 volume costs about
  as much as its 32-slice output.
* :func:`window_to_255` — HU clip to [lo, hi] mapped linearly to [0, 255] in float64.
* :func:`image_processor` — the SigLIP/CLIP HF image processor on uint8 images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from medmvl_core.errors import InvalidImageError

IntensityFn = Callable[[np.ndarray], np.ndarray]


# ----------------------------------------------------------------------------- intensity
def window_to_255(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Clip to [lo, hi] and map linearly to [0, 255] in float64 (MedM-VL's HU window)."""
    x = np.clip(np.asarray(x, dtype=np.float64), float(lo), float(hi))
    return (x - float(lo)) / (float(hi) - float(lo)) * 255.0


def make_mapper(fn: IntensityFn, dtype) -> Callable[[np.ndarray], np.ndarray]:
    """A fast ``v -> fn(v).astype(float32)`` for arrays of ``dtype`` (a lookup table for 8/16-bit ints).

    ``fn`` is evaluated in float64, then cast to float32, as MONAI does before interpolating.
    """
    dtype = np.dtype(dtype)
    if dtype in (np.dtype(np.int16), np.dtype(np.uint16), np.dtype(np.int8), np.dtype(np.uint8)):
        info = np.iinfo(dtype)
        lut = fn(np.arange(info.min, info.max + 1, dtype=np.float64)).astype(np.float32)
        if info.min == 0:
            return lambda v: lut[v]
        unsigned = np.dtype(f"u{dtype.itemsize}")
        flip = unsigned.type(1 << (8 * dtype.itemsize - 1))
        # two's complement with the sign bit flipped = offset binary: value - min as an index
        return lambda v: lut[np.ascontiguousarray(v).view(unsigned) ^ flip]
    return lambda v: fn(np.asarray(v, dtype=np.float64)).astype(np.float32)


# ----------------------------------------------------------------------------- crop
def foreground_box(arr: np.ndarray, fn: IntensityFn | None = None,
                   chunk: int = 16) -> tuple[tuple[int, int], ...] | None:
    """Half-open box ``((d0, d1), (h0, h1), (w0, w1))`` of voxels with ``fn(arr) > 0``.

    MONAI ``CropForeground`` semantics with its defaults (margin 0, k_divisible 1). Returns
    None when no voxel is positive. ``fn`` must be non-decreasing (a window or an affine map
    with positive scale); for integer arrays it is turned into a threshold.
    """
    if arr.ndim != 3:
        raise ValueError(f"foreground_box expects [D, H, W], got {arr.shape}")
    thr = None
    if fn is not None and np.issubdtype(arr.dtype, np.integer) and arr.dtype.itemsize <= 2:
        info = np.iinfo(arr.dtype)
        vals = np.arange(info.min, info.max + 1, dtype=np.int64)
        pos = fn(vals.astype(np.float64)) > 0
        if not pos.any():
            return None
        thr = int(vals[np.argmax(pos)])  # first positive value; monotone -> mask = arr >= thr
    d_any = np.zeros(arr.shape[0], bool)
    h_any = np.zeros(arr.shape[1], bool)
    w_any = np.zeros(arr.shape[2], bool)
    for s in range(0, arr.shape[0], chunk):
        block = arr[s:s + chunk]
        if thr is not None:
            m = block >= thr
        elif fn is not None:
            m = fn(block.astype(np.float64)) > 0
        else:
            m = block > 0
        d_any[s:s + chunk] = m.any(axis=(1, 2))
        h_any |= m.any(axis=(0, 2))
        w_any |= m.any(axis=(0, 1))
    if not d_any.any():
        return None
    box = []
    for a in (d_any, h_any, w_any):
        nz = np.flatnonzero(a)
        box.append((int(nz[0]), int(nz[-1]) + 1))
    return tuple(box)


# ----------------------------------------------------------------------------- resize
@dataclass(frozen=True)
class LinearWeights:
    """torch's linear-interpolation taps for one axis (align_corners=False, float32)."""

    i0: np.ndarray
    i1: np.ndarray
    l0: np.ndarray
    l1: np.ndarray


def linear_weights(n_in: int, n_out: int) -> LinearWeights:
    """Source indices and float32 weights exactly as torch's CPU ``upsample_linear`` computes them."""
    f = np.float32
    scale = f(n_in) / f(n_out)
    # torch computes scale * (i + 0.5) - 0.5 as one fused multiply-add: exact product, one rounding
    src = (np.float64(scale) * (np.arange(n_out, dtype=f) + f(0.5)).astype(np.float64) - 0.5).astype(f)
    src = np.maximum(src, f(0)).astype(f)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = i0 + (i0 < n_in - 1)
    l1 = np.clip(src - i0.astype(f), f(0), f(1)).astype(f)
    l0 = (f(1) - l1).astype(f)
    return LinearWeights(i0, i1, l0, l1)


def _interp_axis(x: np.ndarray, axis: int, w: LinearWeights, pos0: np.ndarray,
                 pos1: np.ndarray) -> np.ndarray:
    """One separable pass: ``fma(x[i0], l0, x[i1] * l1)`` in float32 (torch's operation order)."""
    shape = [1] * x.ndim
    shape[axis] = len(w.l0)
    a = np.take(x, pos0, axis=axis).astype(np.float64)
    b = np.take(x, pos1, axis=axis) * w.l1.reshape(shape)  # float32 product, rounded
    # a*l0 is exact in float64; adding b then rounding once to float32 is torch's fused multiply-add
    a *= w.l0.reshape(shape)
    a += b
    return a.astype(np.float32)


def resize_trilinear(x: np.ndarray, size: Sequence[int],
                     fn: IntensityFn | None = None,
                     box: Sequence[tuple[int, int]] | None = None,
                     chunk: int = 8) -> np.ndarray:
    """Trilinear resize of ``fn(x[box])`` to ``size`` = (D, H, W), float32, MONAI/torch semantics.

    Args:
        x: [D, H, W] array of any real dtype.
        size: output shape.
        fn: intensity map applied (in float64, then cast to float32 as MONAI does) before
            interpolating; None means a plain float32 cast.
        box: half-open crop box per axis, applied before resizing. Only the slices the depth
            interpolation reads are touched, a few at a time, so memory stays small.
        chunk: slices processed together.
    Returns:
        float32 array of shape ``size``.
    """
    if box is None:
        box = [(0, n) for n in x.shape]
    n_in = [b - a for a, b in box]
    if min(n_in) <= 0:
        raise InvalidImageError(f"cannot resize an empty region {list(box)}")
    mapper = make_mapper(fn or (lambda v: v), x.dtype)
    (d0, _), (h0, h1), (w0, w1) = box
    if tuple(n_in) == tuple(size):  # MONAI skips interpolation then (values still cast to float32)
        return np.ascontiguousarray(mapper(x[d0:d0 + n_in[0], h0:h1, w0:w1]))
    wd, wh, ww = (linear_weights(n, m) for n, m in zip(n_in, size))
    used = np.unique(np.concatenate([wd.i0, wd.i1]))
    plane = np.empty((len(used), size[1], size[2]), np.float32)
    for s in range(0, len(used), chunk):
        idx = used[s:s + chunk] + d0
        blk = mapper(x[idx, h0:h1, w0:w1])
        blk = _interp_axis(blk, 2, ww, ww.i0, ww.i1)
        plane[s:s + chunk] = _interp_axis(blk, 1, wh, wh.i0, wh.i1)
    return _interp_axis(plane, 0, wd, np.searchsorted(used, wd.i0), np.searchsorted(used, wd.i1))


# ----------------------------------------------------------------------------- 2D processor
def adaptive_bins(n_in: int, n_out: int) -> list[tuple[int, int]]:
    """Half-open source ranges of each output cell, as torch's adaptive pooling draws them:
    [floor(o * n_in / n_out), ceil((o + 1) * n_in / n_out)); never empty, may overlap."""
    return [((o * n_in) // n_out, -((-(o + 1) * n_in) // n_out)) for o in range(n_out)]


def resize_window_max(x: np.ndarray, size: Sequence[int], lo: float, hi: float,
                      box: Sequence[tuple[int, int]] | None = None) -> np.ndarray:
    """Area-maximum resize of ``x[box]`` windowed to [lo, hi] -> [0, 1], float32, shape ``size``.

    Each output cell holds the largest windowed value of the source voxels it covers (adaptive
    max pooling), so a structure smaller than a cell keeps its full intensity instead of being
    averaged with its surroundings as in a trilinear resize — the reason to feed it as an extra
    channel: a 15 mm calcification at 1000 HU stays at 1000 HU in a 5 mm grid.
    """
    if box is None:
        box = [(0, n) for n in x.shape]
    n_in = [b - a for a, b in box]
    if min(n_in) <= 0:
        raise InvalidImageError(f"cannot resize an empty region {list(box)}")
    v = x[tuple(slice(a, b) for a, b in box)]
    for axis, (n, m) in enumerate(zip(n_in, size)):
        if n != m:
            v = np.stack([v.take(range(a, b), axis=axis).max(axis=axis)
                          for a, b in adaptive_bins(n, int(m))], axis=axis)
    v = (np.clip(v.astype(np.float64), lo, hi) - lo) / (hi - lo)
    return np.ascontiguousarray(v, dtype=np.float32)


def pil_resize_uint8(img: np.ndarray, height: int, width: int, resample: int = 3) -> np.ndarray:
    """PIL resize of an [H, W] or [H, W, 3] uint8 image (what HF image processors call)."""
    from PIL import Image

    if img.shape[0] == height and img.shape[1] == width:
        return img  # PIL returns a copy for the same size: identical values
    return np.asarray(Image.fromarray(img).resize((width, height), resample=resample))


def clip_shortest_edge_size(h: int, w: int, size: int) -> tuple[int, int]:
    """transformers ``get_resize_output_image_size(default_to_square=False)`` for an int size."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if w <= h else (new_short, new_long)


def image_processor(img: np.ndarray, norm: dict) -> tuple[np.ndarray, dict]:
    """Run a SigLIP/CLIP HF image processor on one uint8 RGB image [H, W, 3].

    Returns (float32 [3, S, S], mapping) where mapping gives, per output axis (y, x), the
    source-pixel ``start`` and ``extent`` the output spans (for the geometry record).
    """
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"image_processor expects uint8 [H, W, 3], got {img.dtype} {img.shape}")
    h, w = img.shape[:2]
    size = int(norm["image_size"])
    crop = norm.get("crop_size")
    resample = int(norm.get("resample", 3))
    if crop is None:
        rh, rw = size, size
    else:
        rh, rw = clip_shortest_edge_size(h, w, size)
    out = pil_resize_uint8(img, rh, rw, resample)
    starts, extents = [0.0, 0.0], [float(h), float(w)]
    if crop is not None:
        out, (top, left) = center_crop(out, int(crop))
        starts = [top * h / rh, left * w / rw]
        extents = [int(crop) * h / rh, int(crop) * w / rw]
    x = (out.astype(np.float64) * float(norm.get("rescale", 1 / 255))).astype(np.float32)
    mean = np.asarray(norm["mean"], dtype=np.float32)
    std = np.asarray(norm["std"], dtype=np.float32)
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1)), {"start": starts, "extent": extents}


def center_crop(img: np.ndarray, crop: int) -> tuple[np.ndarray, tuple[int, int]]:
    """transformers ``center_crop`` (zero padding when the image is smaller). Returns (image, (top, left))."""
    h, w = img.shape[:2]
    top = (h - crop) // 2
    left = (w - crop) // 2
    if top >= 0 and left >= 0:
        return img[top:top + crop, left:left + crop], (top, left)
    # transformers pads symmetrically to at least the crop size, then crops
    new_h, new_w = max(crop, h), max(crop, w)
    padded = np.zeros((new_h, new_w) + img.shape[2:], dtype=img.dtype)
    top_pad = (new_h - h + 1) // 2
    left_pad = (new_w - w + 1) // 2
    padded[top_pad:top_pad + h, left_pad:left_pad + w] = img
    t = top + top_pad
    lft = left + left_pad
    return padded[t:t + crop, lft:lft + crop], (t - top_pad, lft - left_pad)


def slices_image_processor(vol_u8: np.ndarray, norm: dict, channels: int = 3) -> np.ndarray:
    """The HF image processor applied to every slice of a uint8 [D, H, W] volume.

    The slices are grey copied to ``channels`` (MedM-VL: ``expand(-1, 3, -1, -1)``).
    Returns float32 [C, D, S', S'] (S' = image size, or crop size for CLIP).
    """
    d, h, w = vol_u8.shape
    size = int(norm["image_size"])
    crop = norm.get("crop_size")
    rh, rw = (size, size) if crop is None else clip_shortest_edge_size(h, w, size)
    if (rh, rw) != (h, w):
        vol_u8 = np.stack([pil_resize_uint8(s, rh, rw, int(norm.get("resample", 3))) for s in vol_u8])
    if crop is not None:
        top, left = (rh - int(crop)) // 2, (rw - int(crop)) // 2
        if top < 0 or left < 0:
            vol_u8 = np.stack([center_crop(s, int(crop))[0] for s in vol_u8])
        else:
            vol_u8 = vol_u8[:, top:top + int(crop), left:left + int(crop)]
    x = (vol_u8.astype(np.float64) * float(norm.get("rescale", 1 / 255))).astype(np.float32)
    mean = np.asarray(norm["mean"], dtype=np.float32)[:channels]
    std = np.asarray(norm["std"], dtype=np.float32)[:channels]
    return ((x[None] - mean[:, None, None, None]) / std[:, None, None, None]).astype(np.float32)


def slices_geometry(h: int, w: int, norm: dict) -> tuple[list[float], list[float]]:
    """(start, extent) in input pixels along (y, x) spanned by the per-slice processor output."""
    crop = norm.get("crop_size")
    if crop is None:
        return [0.0, 0.0], [float(h), float(w)]
    rh, rw = clip_shortest_edge_size(h, w, int(norm["image_size"]))
    top, left = (rh - int(crop)) // 2, (rw - int(crop)) // 2
    return [top * h / rh, left * w / rw], [int(crop) * h / rh, int(crop) * w / rw]


# ----------------------------------------------------------------------------- augmentation
@dataclass(frozen=True)
class AugmentParams:
    """MedM-VL's train-mode augmentation: rot90 k times in (H, W), then flips per spatial axis."""

    k: int
    flip_d: bool
    flip_h: bool
    flip_w: bool


def draw_augment(rng: np.random.Generator, p_rot: float = 0.5, p_flip: float = 0.1) -> AugmentParams:
    """Draw rot90/flip parameters with MedM-VL's probabilities (RandRotate90 p=0.5, k in 1..3;
    RandFlip p=0.1 on each of D, H, W). Seeded by ``rng`` (MedM-VL's own draws are unseeded)."""
    k = int(rng.integers(1, 4)) if rng.random() < p_rot else 0
    return AugmentParams(k, bool(rng.random() < p_flip), bool(rng.random() < p_flip),
                         bool(rng.random() < p_flip))


def augment_volume(x: np.ndarray, params: AugmentParams) -> np.ndarray:
    """Apply rot90 (torch.rot90 semantics on the last two axes) and flips to [C, D, H, W]."""
    if params.k:
        x = np.rot90(x, params.k, axes=(-2, -1))
    axes = [a for a, f in zip((-3, -2, -1), (params.flip_d, params.flip_h, params.flip_w)) if f]
    if axes:
        x = np.flip(x, axis=axes)
    return np.ascontiguousarray(x)
