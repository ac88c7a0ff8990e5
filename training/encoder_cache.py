"""On-disk cache of frozen-encoder outputs, keyed by image content hash (safetensors files).

With a frozen encoder (stage 1), each image's encoder output (before the connector, which
trains) is computed once and read back in later epochs; the dataset then skips reading and
preprocessing those images. Keys are sha256 of the file bytes + the preprocessing spec, so a
changed file or spec is a miss. Writes are atomic (temp file + rename), so several processes
may share one cache folder.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


class EncoderCache:
    """``get``/``put`` per-image feature tensors ([T, C] for an image, [D, T, C] for a CT through a 2D encoder)."""

    def __init__(self, root: str | Path, tag: str = ""):
        self.root = Path(root)
        self.tag = tag  # e.g. the encoder weights' identity, so two encoders never share entries
        self.root.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> Path:
        k = f"{self.tag}-{key}" if self.tag else key
        return self.root / k[:2] / f"{k}.safetensors"

    def has(self, key: str) -> bool:
        return self._path(key).is_file()

    def get(self, key: str) -> torch.Tensor:
        from safetensors.torch import load_file

        self.hits += 1
        return load_file(str(self._path(key)))["features"]

    def put(self, key: str, features: torch.Tensor) -> None:
        from safetensors.torch import save_file

        self.misses += 1
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f"{p.name}.{os.getpid()}.tmp")
        save_file({"features": features.detach().to("cpu").contiguous()}, str(tmp))
        os.replace(tmp, p)
