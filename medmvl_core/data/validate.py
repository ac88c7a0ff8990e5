"""Validate a MedM-VL JSON data file: structure, placeholders, files, readability, lengths.

Used by ``medmvl-train validate`` and by the training recipe before it starts. Nothing is
silent: every bad row is listed with its kind of problem, and a summary counts them.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from medmvl_core.data.datasets import RowProblem, encode_train, read_json_list, row_problems

logger = logging.getLogger(__name__)


@dataclass
class ValidationReport:
    """Summary of one data file. ``problems`` lists every bad row's problems."""

    path: str
    rows: int = 0
    good_rows: int = 0
    with_image: int = 0
    with_image3d: int = 0
    text_only: int = 0
    turns: int = 0
    lengths: list = field(default_factory=list)   # token counts (with image tokens) when a processor was given
    problems: list = field(default_factory=list)  # list[RowProblem]

    @property
    def bad_rows(self) -> int:
        return len({(p.source, p.index) for p in self.problems})

    @property
    def ok(self) -> bool:
        return not self.problems

    def counts(self) -> dict:
        return dict(Counter(p.kind for p in self.problems))

    def summary(self, max_listed: int = 20) -> str:
        lines = [f"{self.path}: {self.rows} rows, {self.good_rows} good, {self.bad_rows} bad",
                 f"  with <image>: {self.with_image}, with <image3d>: {self.with_image3d}, text only: {self.text_only}, "
                 f"turns: {self.turns}"]
        if self.lengths:
            s = sorted(self.lengths)
            lines.append(f"  tokens per sample (with image tokens): min {s[0]}, median {s[len(s) // 2]}, max {s[-1]}, "
                         f"total {sum(s)}")
        if self.problems:
            lines.append("  problems: " + ", ".join(f"{k} {v}" for k, v in sorted(self.counts().items())))
            for p in self.problems[:max_listed]:
                lines.append(f"    {p}")
            if len(self.problems) > max_listed:
                lines.append(f"    ... and {len(self.problems) - max_listed} more")
        return "\n".join(lines)


def validate_data(path: str | Path, image_dir: Optional[str | Path] = None, image3d_dir: Optional[str | Path] = None,
                  *, processor: Any = None, max_length: Optional[int] = None, read_images: bool = False,
                  require_answer: bool = True) -> ValidationReport:
    """Check every row of a MedM-VL JSON file.

    Always: JSON structure, alternating turns, an answer last (``require_answer``), placeholder
    counts against the ``image``/``image3d`` lists, files exist. With ``read_images``: each file is
    read with :func:`medmvl_core.imaging.read_image` (any supported format). With a ``processor``:
    each conversation is encoded in train mode (template, label masking) and its length with
    image tokens is compared with ``max_length`` (kind ``too_long``); encoding errors are
    reported as kind ``encode_error``.
    """
    rows = read_json_list(path, "data file", "check the path given to validate (--data)")
    rep = ValidationReport(path=str(path), rows=len(rows))
    idir = Path(image_dir) if image_dir else None
    i3dir = Path(image3d_dir) if image3d_dir else None
    read_image = None
    if read_images:
        from medmvl_core.imaging import read_image  # noqa: F811 - heavy import only when asked
    for i, row in enumerate(rows):
        rec, probs = row_problems(row, i, str(path), idir, i3dir, require_answer=require_answer)
        if rec is not None:
            rep.turns += len(rec.conversations)
            rep.with_image += bool(rec.images)
            rep.with_image3d += bool(rec.images3d)
            rep.text_only += not rec.images and not rec.images3d
            if read_image is not None:
                for f in list(rec.images) + list(rec.images3d):
                    try:
                        read_image(str(f))
                    except Exception as exc:  # any reader failure is a bad row, reported
                        probs.append(RowProblem(str(path), i, rec.id, "unreadable_file", f"{f}: {exc}"))
            if processor is not None:
                try:
                    enc = encode_train(processor, rec.conversations,
                                       {"image": len(rec.images), "image3d": len(rec.images3d)})
                    n = len(enc["input_ids"])
                    rep.lengths.append(n)
                    if max_length is not None and n > max_length:
                        probs.append(RowProblem(str(path), i, rec.id, "too_long",
                                                f"{n} tokens with image tokens > max_length {max_length}"))
                    elif all(v == -100 for v in enc["labels"]):
                        probs.append(RowProblem(str(path), i, rec.id, "no_supervised_tokens",
                                                "every label is masked; nothing to learn from this row"))
                except Exception as exc:  # tokenization mismatch, bad template... reported per row
                    probs.append(RowProblem(str(path), i, rec.id, "encode_error", str(exc)))
        rep.problems.extend(probs)
        if not probs:
            rep.good_rows += 1
    return rep
