"""The feature cache: each image is preprocessed and encoded once, keyed by its content hash
(+ crop box), and kept LRU within a byte budget."""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np
import torch

from medmvl_core.engine.cache import LRUCache
from medmvl_core.engine.errors import RequestError
from medmvl_core.engine.hashing import volume_hash
from medmvl_core.engine.records import ImageEntry


def input_kind(volume: Any) -> str:
    """``"image"`` for a 2D image ([1, H, W], [1, H, W, 3] or [H, W]), else ``"image3d"``."""
    shape = tuple(np.shape(volume.array))
    if len(shape) == 2 or len(shape) == 4 or (len(shape) == 3 and shape[0] == 1):
        return "image"
    return "image3d"


def supported_kinds(model: Any) -> tuple[str, ...]:
    """The placeholder kinds the model can take (``num_image_tokens`` does not raise)."""
    out = []
    for kind in ("image", "image3d"):
        try:
            if int(model.num_image_tokens(kind)) > 0:
                out.append(kind)
        except Exception:  # noqa: BLE001 - no path for this kind
            pass
    return tuple(out)


def _tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class FeatureCache:
    """Preprocessed tensors and encoder outputs of the images asked about.

    ``images`` is the LRU map (``budget_bytes`` counts the tensor and the encoder output of each
    entry); ``use_cache=False`` preprocesses and encodes every time (the reference path). ``hook``
    is called with "preprocess" / "encode" before each (tests inject failures through it).
    """

    def __init__(self, model: Any, processor: Any, device: torch.device, dtype: torch.dtype, *,
                 budget_bytes: int, use_cache: bool = True,
                 hook: Callable[[str], None] | None = None):
        self.model, self.processor = model, processor
        self.device, self.dtype = device, dtype
        self.use_cache = use_cache
        self.hook = hook or (lambda stage: None)
        self.kinds = supported_kinds(model)
        self.images: LRUCache[ImageEntry] = LRUCache(
            budget_bytes, lambda e: _tensor_bytes(e.tensor) + _tensor_bytes(e.embeds))

    def kind_for(self, volume: Any) -> str:
        """Which placeholder a volume takes; raises when the model has no path for it."""
        kind = input_kind(volume)
        if kind not in self.kinds:
            what = "2D images" if kind == "image" else "3D volumes"
            raise RequestError(f"this model does not take {what} (it takes "
                               f"{', '.join(self.kinds) or 'nothing'})", code="wrong_input_kind")
        return kind

    def prepare(self, volume: Any, roi: Sequence[float] | None = None,
                timings: dict | None = None, vhash: str | None = None) -> ImageEntry:
        """Preprocess + encode ``volume`` (optionally cropped to a voxel ``roi``), with caching.

        timings gets ``preprocess_s`` and ``encode_s``; vhash: the volume's content hash when
        the caller knows it (saves hashing the voxels again).
        """
        timings = timings if timings is not None else {}
        kind = self.kind_for(volume)
        key = (vhash or volume_hash(volume), tuple(float(v) for v in roi) if roi else None)
        entry = self.images.get(key) if self.use_cache else None
        t0 = time.perf_counter()
        if entry is None:
            self.hook("preprocess")
            try:
                if kind == "image3d":
                    arr, geom = self.processor.preprocess_volume(volume, roi=roi)
                elif roi is not None:
                    arr, geom = self.processor.preprocess_image(volume, roi=roi)
                else:
                    arr, geom = self.processor.preprocess_image(volume)
            except TypeError as exc:
                raise RequestError(f"this model cannot crop its input to a box: {exc}") from exc
            tensor = torch.as_tensor(np.asarray(arr)).to(self.device, self.dtype)
            entry = ImageEntry(key, tensor, geom)
        timings["preprocess_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if entry.embeds is None:
            self.hook("encode")
            with torch.inference_mode():
                if kind == "image3d":
                    embeds = self.model.encode_images(images3d=entry.tensor[None])
                else:
                    embeds = self.model.encode_images(images=entry.tensor[None])
                if getattr(self.model.config, "box_refs", None) and kind == getattr(self.model, "box_ref_kind", None):
                    entry.boxes = self.model.find_boxes(entry.tensor[None])[0].float().cpu()
            entry.embeds = embeds
            if self.use_cache:
                self.images.put(key, entry)
        timings["encode_s"] = time.perf_counter() - t0
        return entry

    def box_resolver(self, entry: ImageEntry) -> Callable[[str], str] | None:
        """The answer-text rewrite of a box_refs model: each box reference token becomes its box."""
        labels = getattr(self.model.config, "box_refs", None)
        if not labels or entry.boxes is None:
            return None
        from medmvl_core.model.box_refs import resolve_box_refs

        boxes, kind = entry.boxes, self.model.box_ref_kind
        return lambda text: resolve_box_refs(text, boxes, labels, kind)
