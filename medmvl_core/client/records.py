"""Answers as records: what was asked, what the model said, which model, when, and the boxes.

A :class:`Conversation` belongs to one volume and holds :class:`Turn` records. It round-trips
through JSON (stored in the Slicer scene, saved by the viewer, read by ``medmvl export``) and
renders as Markdown or plain text for pasting into a reporting system. Every rendering names the
model, its intended use and says the text is AI-generated and not reviewed. Standard library +
numpy only (importable in Slicer's Python and the viewer without torch).

Voxel boxes are ``(k1, j1, i1, k2, j2, i2)``, end exclusive, in the volume's array order; 2D
boxes ``(j1, i1, j2, i2)``. ``ijk_to_lps`` maps (i, j, k, 1) voxel indices to patient LPS mm
(DICOM's patient coordinate system).
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from medmvl_core.client.model_identity import ModelIdentity
from medmvl_core.client.protocol import TASK_SPECS
from medmvl_core.errors import MedMVLError

FORMAT = "medmvl.conversation"
VERSION = 1
AI_FLAG = "AI-generated, not reviewed"
# A 3D box as a model writes it: [z1, y1, x1, z2, y2, x2], normalised to 0-1.
#: a box as the model writes it: 3D ``[z1, y1, x1, z2, y2, x2]`` (0-1) or MedM-VL's 2D ``{<x1><y1><x2><y2>}``
_BOX_TEXT = re.compile(r"\[\s*-?[\d.]+(?:\s*,\s*-?[\d.]+){5}\s*\]|\{\s*(?:<\s*-?\d+\s*>\s*){4}\}")
#: task -> the heading of its turns in Markdown and SR (the protocol's task table)
TASK_LABELS = {t.name: t.record_label for t in TASK_SPECS.values()}


class RecordFormatError(MedMVLError, ValueError):
    """A stored conversation that this version cannot read (other format, newer version,
    missing fields)."""

    code = "bad_record"


def now_iso() -> str:
    """The current time, UTC, ISO 8601 with seconds (``2026-12-06T20:31:15Z``)."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class BoxRecord:
    """A box in the volume's voxel grid. source: "found" (the model returned it), "drawn" (the
    user's ROI), "segment" (a segment's bounding box). model: the normalised box the model
    wrote (found boxes only). roi_id: the scene node that shows it (Slicer), else ""."""

    voxel: list[int]
    source: str = "found"
    label: str = ""
    model: list[float] = field(default_factory=list)
    physical_lps: list[float] = field(default_factory=list)
    roi_id: str = ""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BoxRecord":
        if not isinstance(d, dict) or "voxel" not in d:
            raise RecordFormatError("a stored box has no voxel range")
        return cls(voxel=[int(v) for v in d["voxel"]], source=str(d.get("source", "found")),
                   label=str(d.get("label", "")),
                   model=[float(v) for v in d.get("model") or []],
                   physical_lps=[float(v) for v in d.get("physical_lps") or []],
                   roi_id=str(d.get("roi_id", "")))


@dataclass
class VolumeRef:
    """The volume a conversation is about: no patient data, only geometry and, when the input
    was DICOM, the UIDs an export must reference (``study_uid``, ``series_uid``,
    ``frame_of_reference_uid``, ``sop_instance_uids``)."""

    key: str = ""
    shape: list[int] = field(default_factory=list)
    ijk_to_lps: list[list[float]] = field(default_factory=lambda: np.eye(4).tolist())
    modality: str = ""
    dicom: dict[str, Any] = field(default_factory=dict)

    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (i, j, k) in mm (column norms of ``ijk_to_lps``)."""
        m = np.asarray(self.ijk_to_lps, float)
        return tuple(float(v) for v in np.linalg.norm(m[:3, :3], axis=0))  # type: ignore[return-value]


@dataclass
class Turn:
    """One question and its answer. status: "answered" | "cancelled" | "error"."""

    task: str
    question: str
    answer: str
    model: ModelIdentity
    generation: dict[str, Any] = field(default_factory=dict)
    asked_at: str = ""
    answered_at: str = ""
    region: BoxRecord | None = None
    boxes: list[BoxRecord] = field(default_factory=list)
    status: str = "answered"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["model"] = self.model.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Turn":
        missing = [k for k in ("task", "answer", "model") if k not in d]
        if missing:
            raise RecordFormatError(f"a stored turn misses {', '.join(missing)}")
        return cls(task=str(d["task"]), question=str(d.get("question", "")),
                   answer=str(d["answer"]), model=ModelIdentity.from_dict(d["model"]),
                   generation=dict(d.get("generation") or {}),
                   asked_at=str(d.get("asked_at", "")), answered_at=str(d.get("answered_at", "")),
                   region=BoxRecord.from_dict(d["region"]) if d.get("region") else None,
                   boxes=[BoxRecord.from_dict(b) for b in d.get("boxes") or []],
                   status=str(d.get("status", "answered")))


@dataclass
class Conversation:
    """Every turn about one volume, oldest first."""

    volume: VolumeRef = field(default_factory=VolumeRef)
    turns: list[Turn] = field(default_factory=list)

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "volume": asdict(self.volume),
                "turns": [t.to_dict() for t in self.turns]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: Any) -> "Conversation":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise RecordFormatError("this is not a MedM-VL conversation record (no "
                                    f"\"format\": \"{FORMAT}\")")
        version = d.get("version")
        if not isinstance(version, int) or version > VERSION:
            raise RecordFormatError(
                f"the conversation was saved by a newer MedM-VL (record version {version!r}, this "
                f"version reads up to {VERSION}); update the MedM-VL module to read it")
        v = d.get("volume") or {}
        vol = VolumeRef(key=str(v.get("key", "")), shape=[int(s) for s in v.get("shape") or []],
                        ijk_to_lps=v.get("ijk_to_lps") or np.eye(4).tolist(),
                        modality=str(v.get("modality", "")), dicom=dict(v.get("dicom") or {}))
        return cls(volume=vol, turns=[Turn.from_dict(t) for t in d.get("turns") or []])

    @classmethod
    def from_json(cls, text: str) -> "Conversation":
        try:
            d = json.loads(text)
        except ValueError as exc:
            raise RecordFormatError(f"the stored conversation is not valid JSON ({exc}); it was "
                                    "damaged or written by another program") from exc
        return cls.from_dict(d)

    # ------------------------------------------------------------------ text
    def models(self) -> list[ModelIdentity]:
        """The distinct models that answered, in order."""
        out: list[ModelIdentity] = []
        for t in self.turns:
            if t.model not in out:
                out.append(t.model)
        return out

    def to_markdown(self) -> str:
        """Markdown for a reporting system: AI flag, models, then each question and answer."""
        lines = [f"## MedM-VL answers — {AI_FLAG}", ""]
        for m in self.models():
            lines.append(f"- Model: {m.label()}")
        if self.volume.shape:
            lines.append(f"- Image: {self.volume.modality or 'image'}, "
                         f"{' × '.join(str(s) for s in self.volume.shape)} voxels")
        lines.append("")
        for t in self.turns:
            head = TASK_LABELS.get(t.task, t.task)
            q = f": {t.question}" if t.question else ""
            lines.append(f"**{head}**{q}  ")
            if t.region is not None:
                lines.append(f"Region: {describe_box(t.region, self.volume.spacing())}  ")
            status = "" if t.status == "answered" else f" ({t.status})"
            who = ", ".join(x for x in (t.model.name, t.answered_at or t.asked_at) if x)
            answer = _without_box_numbers(t.answer, len(t.boxes)) if t.boxes else t.answer
            lines.append(f"**Answer**{status} ({who}): {answer}  ")
            for b in t.boxes:
                lines.append(f"Box: {describe_box(b, self.volume.spacing())}  ")
            lines.append("")
        return "\n".join(lines).rstrip() + "\n"

    def to_text(self) -> str:
        """Plain text (the Markdown without its markup)."""
        md = self.to_markdown().replace("**", "").replace("## ", "").replace("  \n", "\n")
        return md


def describe_box(box: BoxRecord, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                 shown: bool = False) -> str:
    """A box as a person reads it: label, inclusive voxel ranges and size in mm.

    ``spacing`` is (i, j, k) in mm. 3D: "nodule: slices 10–13, rows 30–37, columns 22–28
    (5.0 × 8.0 × 12.0 mm)"; sizes are columns × rows × slices.
    """
    v = [int(x) for x in box.voxel]
    name = box.label or {"drawn": "drawn region", "segment": "segment"}.get(box.source, "box")
    if len(v) == 6:
        k1, j1, i1, k2, j2, i2 = v
        size = ((i2 - i1) * spacing[0], (j2 - j1) * spacing[1], (k2 - k1) * spacing[2])
        text = (f"{name}: slices {k1}–{k2 - 1}, rows {j1}–{j2 - 1}, columns {i1}–{i2 - 1} "
                f"({size[0]:.1f} × {size[1]:.1f} × {size[2]:.1f} mm)")
    elif len(v) == 4:
        j1, i1, j2, i2 = v
        text = (f"{name}: rows {j1}–{j2 - 1}, columns {i1}–{i2 - 1} "
                f"({(i2 - i1) * spacing[0]:.1f} × {(j2 - j1) * spacing[1]:.1f} mm)")
    else:
        text = f"{name}: {v}"
    return text + (", shown in the views" if shown else "")


def _without_box_numbers(text: str, n_boxes: int) -> str:
    rest = re.sub(r"\s+([.,;])", r"\1", _BOX_TEXT.sub("", text)).strip(" ,;\n")
    return rest or f"found {n_boxes} box" + ("es" if n_boxes > 1 else "")


def readable_answer(text: str, boxes: Sequence[BoxRecord], spacing: Sequence[float],
                    shown: bool = True) -> str:
    """An answer for people: when it found boxes, the model's normalised numbers are replaced
    by one line per box (label, voxel ranges, size in mm)."""
    if not boxes:
        return text
    head = _without_box_numbers(text, len(boxes))
    return head + "".join("\n  " + describe_box(b, spacing, shown=shown) for b in boxes)


def chat_text(entries: Sequence[Any], conv: "Conversation | None",
              fallback_model: ModelIdentity | None = None) -> str:
    """The chat as the panel and the viewer show it: a ``Model: ...`` line per answering model
    (or ``fallback_model`` before the first answer), then each entry (objects with ``role`` and
    ``text``: the controller's history); the n-th answer gets the n-th turn's boxes in words."""
    turns = conv.turns if conv is not None else []
    models = conv.models() if conv is not None and conv.turns else []
    if not models and fallback_model is not None:
        models = [fallback_model]
    spacing = conv.volume.spacing() if conv is not None else (1.0, 1.0, 1.0)
    lines = [f"Model: {m.label()}" for m in models]
    names = {"user": "You", "assistant": "MedM-VL", "error": "Error"}
    n_answer = 0
    for e in entries:
        text = e.text
        if e.role == "assistant":
            text = readable_answer(text, turns[n_answer].boxes if n_answer < len(turns) else [], spacing)
            n_answer += 1
        lines.append(f"{names.get(e.role, e.role)}: {text}")
    return "\n\n".join(lines)


def box_corners_lps(voxel: Sequence[int], ijk_to_lps: np.ndarray) -> np.ndarray:
    """The 8 corners [8, 3] (LPS mm) of a 3D voxel box: voxel edges, half a voxel outside the
    first and last voxel centres, so the box covers exactly the voxels it names."""
    k1, j1, i1, k2, j2, i2 = (float(x) for x in voxel)
    m = np.asarray(ijk_to_lps, float)
    corners = np.array([[i, j, k, 1.0] for k in (k1 - 0.5, k2 - 0.5)
                        for j in (j1 - 0.5, j2 - 0.5) for i in (i1 - 0.5, i2 - 0.5)])
    return (corners @ m.T)[:, :3]


def found_boxes(answer_boxes: Sequence[dict], label: str) -> list[BoxRecord]:
    """The worker's answer boxes (``{"model", "voxel", "physical_lps"}``) as records, one per
    distinct voxel box, named ``label`` (the thing asked for)."""
    out: list[BoxRecord] = []
    seen: set[tuple[int, ...]] = set()
    for b in answer_boxes or []:
        vox = b.get("voxel") if isinstance(b, dict) else None
        if vox is None or len(vox) not in (4, 6):
            continue
        t = tuple(int(round(float(x))) for x in vox)
        if t in seen:
            continue
        seen.add(t)
        out.append(BoxRecord(voxel=list(t), source="found", label=label,
                             model=[float(x) for x in b.get("model") or []],
                             physical_lps=[float(x) for x in b.get("physical_lps") or []]))
    return out
