"""What the panel controller and its views share: the states, the records a view hands over and
gets back (:class:`VolumeData`, :class:`ChatEntry`), the listener interface, and small helpers
(voxel fingerprints, memory lines, found boxes, the task checks worded for the panel's user).
Standard library + numpy; imported through :mod:`medmvl_core.client.controller`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from medmvl_core.client import errors
from medmvl_core.client.client import Answer
from medmvl_core.client.protocol import TASK_SPECS, TASKS
from medmvl_core.client.roi_geometry import as_volume_box

#: The worker API version this client speaks (``health()["api"]``).
API_VERSION = 1
#: Released checkpoints offered by "Download a released model".
RELEASED_MODELS = ("shiym2000/MedM-VL-CT-Chest-3B-en", "shiym2000/MedM-VL-2D-3B-en")

# Controller states.
DISCONNECTED, STARTING, READY, BUSY, DEAD, ERROR = (
    "disconnected", "starting", "ready", "busy", "dead", "error")


@dataclass
class VolumeData:
    """What a view hands over: voxels and geometry only (no names from DICOM, no tags).

    key: a stable view-side id (Slicer node ID, file path) that keys history and uploads.
    array: [k, j, i] or [1, H, W(, 3)]; ijk_to_ras: 4x4 (parent transforms included).
    """

    key: str
    array: np.ndarray
    ijk_to_ras: np.ndarray
    modality: str = "CT"
    #: the source series' UIDs when the input was DICOM (kept in the records, never uploaded)
    dicom: dict = field(default_factory=dict)


@dataclass
class ChatEntry:
    """One line of a volume's history. role: "user" | "assistant" | "error"."""

    role: str
    text: str
    task: str = "ask"
    boxes: list = field(default_factory=list)
    in_context: bool = True  # False once the worker dropped the conversation it belonged to


class ControllerListener:
    """What a view implements (all optional). Called on the GUI thread from ``poll``."""

    def on_state(self, state: str, detail: str) -> None: ...
    def on_health(self, health: dict) -> None: ...
    def on_token(self, key: str, piece: str) -> None: ...
    def on_answer(self, key: str, answer: Answer) -> None: ...
    def on_error(self, key: str | None, message: str) -> None: ...
    def on_progress(self, text: str, fraction: float | None) -> None: ...


def content_key(array: np.ndarray) -> str:
    """A cheap fingerprint of the voxels (shape, dtype, bytes) to know when to re-upload."""
    a = np.ascontiguousarray(array)
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((a.shape, a.dtype.str)).encode())
    h.update(a.tobytes())
    return h.hexdigest()


def format_memory(memory: dict | None) -> str:
    """Health's ``memory`` dict as a short line (``*_bytes`` shown in MiB)."""
    if not memory:
        return "-"
    parts = []
    for k, v in sorted(memory.items()):
        if k.endswith("_bytes") and isinstance(v, (int, float)):
            parts.append(f"{k[:-6].replace('_', ' ')}: {v / 2**20:.0f} MiB")
        else:
            parts.append(f"{k.replace('_', ' ')}: {v}")
    return ", ".join(parts)


def unique_voxel_boxes(boxes: list[dict]) -> list[tuple[int, ...]]:
    """The distinct ``voxel`` boxes of an answer, as int tuples ``(k1, j1, i1, k2, j2, i2)``, in order;
    a 2D image's pixel box ``(j1, i1, j2, i2)`` becomes the box on its one slice (k 0-1)."""
    out: list[tuple[int, ...]] = []
    for b in boxes or []:
        v = b.get("voxel") if isinstance(b, dict) else None
        if v is not None and len(v) in (4, 6):
            t = tuple(int(round(float(x))) for x in as_volume_box(v))
            if t not in out:
                out.append(t)
    return out


def task_prompt_check(task: str, question: str | None, box: Sequence[int] | None) -> None:
    """Raise a clear error, worded for the panel's user, when a task (``TASK_SPECS``, the
    protocol's table) misses its question or box."""
    spec = TASK_SPECS.get(task)
    if spec is None:
        raise errors.BadRequestError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}",
                                     code="bad_task")
    if spec.needs_question and not (question or "").strip():
        what = "what to find" if spec.question_use == "target" else "a question"
        raise errors.BadRequestError(f"{spec.label} needs {what}: type it in the question box",
                                     code="missing_question")
    if spec.needs_box and box is None:
        raise errors.BadRequestError(f"{spec.label} needs a region: select or draw an ROI first",
                                     code="missing_box")


def shown_question(task: str, question: str, box: Sequence[int] | None, region_label: str = "") -> str:
    """The user's line in the transcript: the question, the task's label, the region (named
    ``region_label`` when it has a name, e.g. the segment it came from)."""
    spec = TASK_SPECS.get(task)
    label = spec.label if spec is not None else task
    shown = question if task == "ask" else (f"{label}: {question}" if question else label)
    if box is not None:
        name = f"{region_label}: " if region_label else ""
        shown += f"  [{name}box {list(int(v) for v in box)}]"
    return shown
