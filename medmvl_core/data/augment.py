"""3D train-time augmentation of preprocessed volumes (MedM-VL's MONAI ``transform_train``, with
numpy and a per-sample generator so that a run is reproducible and resumable)."""

from __future__ import annotations

import numpy as np


def random_flip_rot90(volume: np.ndarray, rng: np.random.Generator, flip_p: float = 0.5,
                      intensity: bool = False) -> np.ndarray:
    """3D train augmentation on [C, D, H, W], in MedM-VL's order (its MONAI ``transform_train``):
    rot90 in (H, W) with p=0.5 (k in 1..3, ``RandRotate90(prob=0.5, spatial_axes=(1, 2))``), then a
    flip of each of D, H, W with p=``flip_p`` (MedM-VL: ``RandFlip(prob=0.10)`` per axis); with
    ``intensity`` (MedM-VL's 3D CLIP encoders) ``x * (1 + u)``, u ~ U(-0.1, 0.1), with p=0.5
    (``RandScaleIntensity(factors=0.1)``), then ``x + u`` with p=0.5 (``RandShiftIntensity(offsets=0.1)``)."""
    out = volume
    if rng.random() < 0.5:
        out = np.rot90(out, k=int(rng.integers(1, 4)), axes=(-2, -1))
    for ax in (-3, -2, -1):
        if rng.random() < flip_p:
            out = np.flip(out, axis=ax)
    out = np.ascontiguousarray(out)
    if intensity:
        if rng.random() < 0.5:
            out = out * np.float32(1.0 + rng.uniform(-0.1, 0.1))
        if rng.random() < 0.5:
            out = out + np.float32(rng.uniform(-0.1, 0.1))
    return out
