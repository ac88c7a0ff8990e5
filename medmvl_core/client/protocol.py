"""The wire protocol shared by the worker and its clients (standard library + numpy, no torch).

One place for what both sides must agree on (a new task or setting is added here, and the
worker's request models, the client, the panel controller and the Slicer module follow):

- :class:`GenerationSettings`, how an answer is decoded (cf. transformers' ``GenerationConfig``):
  defaults, bounds and validation; the worker's ``MessageIn`` fields are generated from it;
- the task table :data:`TASK_SPECS` (:class:`TaskSpec`: label, needs a question / a box, the
  prompt the model sees) and :func:`task_spec`;
- the answer wire schema :class:`Answer` (the data of the ``final`` SSE event);
- the SSE codec (``format_sse`` on the worker, ``iter_sse`` in the client);
- the error-code table: each ``code`` the worker sends and its HTTP status (``ERROR_STATUS``);
- the request limits that are part of the contract (JSON body size, box and geometry rules);
- :func:`validate_box`, the one check every task that takes a box goes through — in the worker
  before a question is queued, and in the viewer / Slicer panel before it is sent.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import IO, Any, Iterator, Mapping, Sequence

from medmvl_core.errors import MedMVLError

API_VERSION = 1
API_PREFIX = "/v1"

#: Error code -> HTTP status. Codes not listed are 400 (a bad request).
ERROR_STATUS: dict[str, int] = {
    "unauthorized": 401,
    "not_found": 404, "unknown_session": 404, "unknown_volume": 404, "unknown_route": 404,
    "method_not_allowed": 405,
    "body_timeout": 408,
    "session_busy": 409,
    "session_evicted": 410, "volume_evicted": 410,
    "too_large": 413,
    "unsupported_media_type": 415,
    "invalid_request": 422,
    "queue_full": 429, "uploads_busy": 429,
    "cancelled": 499,
    "internal": 500,
    "loading": 503, "out_of_memory": 503, "shutting_down": 503,
    "timeout": 504,
}

#: Seconds a client should wait before retrying, sent as ``Retry-After`` with these codes.
RETRY_AFTER_S: dict[str, int] = {"queue_full": 2, "uploads_busy": 2, "loading": 5}

#: Largest JSON request body the worker reads (sessions, messages, cancel); uploads have their own.
MAX_JSON_BODY_BYTES = 64 * 1024

#: Voxel spacing the worker accepts, in mm (1e-4 mm .. 10 m); origins within +-1e7 mm.
SPACING_RANGE_MM = (1e-4, 1e4)
MAX_ABS_ORIGIN_MM = 1e7


def status_for(code: str) -> int:
    """The HTTP status of an error ``code`` (400 when the table does not list it)."""
    return ERROR_STATUS.get(code, 400)


class BoxError(MedMVLError, ValueError):
    """A voxel box that does not describe a non-empty region inside the image."""

    code = "bad_box"


# ------------------------------------------------------------------------- generation settings
SEED_MAX = 2**64 - 1  # torch generators take 64-bit seeds


class SettingsError(MedMVLError, ValueError):
    """A generation setting that is unknown, of the wrong type or out of its range."""

    code = "bad_sampling"


def _setting(default: Any, description: str, **bounds: float) -> Any:
    """A :class:`GenerationSettings` field: its default, what it does, its bounds (ge/gt/le)."""
    return field(default=default, metadata={"description": description, **bounds})


@dataclass
class GenerationSettings:
    """How an answer is decoded: greedy unless ``do_sample``; ``seed`` makes sampling repeatable.

    Each field's metadata holds its description and bounds (``ge`` / ``gt`` / ``le``); the
    worker's request model (``worker.models.MessageIn``) and :meth:`validate` are built from
    them, and :meth:`WorkerClient.ask` takes any of them as a keyword, so a new setting is
    added here only. The bounds are what any worker accepts; a worker's own
    ``max_new_tokens`` limit is passed to :meth:`validate`.
    """

    max_new_tokens: int = _setting(256, "the most tokens the answer may have", ge=1, le=1 << 20)
    do_sample: bool = _setting(False, "sample the next token instead of taking the most likely one")
    temperature: float = _setting(1.0, "divides the logits when sampling (> 0 when do_sample)",
                                  ge=0, le=1e4)
    top_p: float = _setting(1.0, "nucleus sampling: keep the most likely tokens up to this "
                                 "probability mass", gt=0, le=1)
    top_k: int = _setting(0, "keep only the k most likely tokens when sampling (0: all)",
                          ge=0, le=1 << 24)
    seed: int | None = _setting(None, "seed of the sampling generator (repeatable answers)",
                                ge=0, le=SEED_MAX)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The settings' names, in order (the wire field names)."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "GenerationSettings":
        """Settings from a mapping of some of them (the rest keep their defaults); raises
        :class:`SettingsError` (``unknown_setting``) for a name that is not a setting."""
        unknown = sorted(set(data) - set(cls.names()))
        if unknown:
            raise SettingsError(f"unknown generation setting(s) {', '.join(unknown)}; the "
                                f"settings are {', '.join(cls.names())}", code="unknown_setting")
        return cls(**dict(data))

    def replace(self, **changes: Any) -> "GenerationSettings":
        """A copy with ``changes`` applied (unknown names raise, as in :meth:`from_dict`)."""
        return self.from_dict({**self.to_dict(), **changes})

    def to_dict(self) -> dict[str, Any]:
        """``{name: value}`` for every setting (the wire form)."""
        return asdict(self)

    def validate(self, max_new_tokens_limit: int | None = None) -> "GenerationSettings":
        """Check types, bounds and that sampling has a temperature > 0; returns ``self``.

        ``max_new_tokens_limit``: the worker's own limit (below the bound of the field). Raises
        :class:`SettingsError` with ``code`` ``bad_max_new_tokens`` for ``max_new_tokens``,
        ``bad_sampling`` for the others.
        """
        for f in fields(self):
            value = getattr(self, f.name)
            problem = _setting_problem(f.name, f.type, value, f.metadata, f.default)
            if problem:
                raise SettingsError(problem, code=_setting_code(f.name))
        limit = max_new_tokens_limit
        if limit is not None and self.max_new_tokens > limit:
            raise SettingsError(f"max_new_tokens must be in 1..{limit}, got {self.max_new_tokens}",
                                code="bad_max_new_tokens")
        if self.do_sample and not self.temperature > 0:
            raise SettingsError(f"temperature must be > 0 when sampling, got {self.temperature}")
        return self


def _setting_code(name: str) -> str:
    return "bad_max_new_tokens" if name == "max_new_tokens" else "bad_sampling"


def _setting_problem(name: str, type_: Any, value: Any, meta: Mapping[str, Any],
                     default: Any) -> str | None:
    """What is wrong with one setting's value (None when nothing is)."""
    # the annotation as written ("int", "bool", "float", "int | None"), or a type object
    kind = getattr(type_, "__name__", str(type_)).split("|")[0].strip()
    if value is None:
        return None if default is None else f"{name} must be given, got None"
    if kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
              and math.isfinite(value))
    if not ok:
        return f"{name} must be a{'n' if kind == 'int' else ''} {kind}, got {value!r}"
    lo, lo_open, hi = meta.get("ge", meta.get("gt")), "gt" in meta, meta.get("le")
    if lo is not None and (value <= lo if lo_open else value < lo):
        return f"{name} must be {'>' if lo_open else '>='} {lo:g}, got {value:g}"
    if hi is not None and value > hi:
        return f"{name} must be <= {hi:g}, got {value:g}"
    return None


# ---------------------------------------------------------------------------------- tasks
class TaskError(MedMVLError, ValueError):
    """An unknown task, or a request that misses what its task needs."""

    code = "bad_task"


@dataclass(frozen=True)
class TaskSpec:
    """One task and its rules.

    name: the wire id. label: what a button or menu shows; record_label: how a saved
    conversation (Markdown, DICOM SR) heads a turn of it. needs_question / needs_box: what a
    request must carry (a box: voxels, see :func:`validate_box`). question_hint: what the
    question is for this task (in error messages). question_use: how the question becomes the
    prompt — ``"prompt"``: it is the prompt (the default prompt when it is empty), ``"target"``:
    it fills ``{question}`` in the default prompt, ``"template"``: a question holding ``{box}``
    is the prompt with the region's box text put in, otherwise the default prompt is used.
    default_prompts: per image kind (``"image"`` 2D, ``"image3d"`` volume), with ``{question}``
    and ``{box}`` (the region in the model's box text) to fill.
    """

    name: str
    label: str
    record_label: str
    needs_question: bool
    needs_box: bool
    question_hint: str
    question_use: str = "prompt"
    default_prompts: Mapping[str, str] = field(default_factory=dict)

    def check_question(self, question: str | None) -> None:
        """Raise :class:`TaskError` (``empty_question``) when the task needs a question and
        ``question`` is empty."""
        if self.needs_question and not (question or "").strip():
            raise TaskError(f"task {self.name!r} needs {self.question_hint}", code="empty_question")

    def check_box(self, box: Sequence[float] | None) -> None:
        """Raise :class:`TaskError` (``bad_box``) when the task needs a box and has none."""
        if self.needs_box and box is None:
            raise TaskError(f"task {self.name!r} needs a box in voxels (k1, j1, i1, k2, j2, i2), "
                            "or (j1, i1, j2, i2) on a 2D image", code="bad_box")

    def prompt(self, kind: str, question: str | None = None, box_text: str | None = None) -> str:
        """The user-turn text the model sees (without the image placeholder).

        kind: ``"image"`` or ``"image3d"``; box_text: the region in the model's box text, needed
        when the prompt shows the region (``describe``; a crop is seen, not written). Raises
        :class:`TaskError` for a missing question, or a prompt with ``{box}`` and no box_text
        (the voxel box itself is checked by :meth:`check_box`).
        """
        self.check_question(question)
        q = (question or "").strip()
        if self.question_use == "template" and "{box}" in q:
            template, values = q, {"box": box_text}
        elif self.question_use == "prompt" and q:
            return q
        else:
            template, values = self.default_prompts[kind], {"question": q, "box": box_text}
        if "{box}" in template and box_text is None:
            self.check_box(None)
            raise TaskError(f"task {self.name!r} shows its region in the prompt: give box_text",
                            code="bad_box")
        def fill(m: re.Match) -> str:
            value = values.get(m.group(1))
            return m.group(0) if value is None else value

        # one pass, so a question holding "{box}" is put in as written
        return re.sub(r"\{(question|box)\}", fill, template)


def _both(prompt: str) -> dict[str, str]:
    return {"image": prompt, "image3d": prompt}


#: The tasks, in the order a panel lists them. The prompts follow MedM-VL's training data.
TASK_SPECS: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("ask", "Ask", "Ask", True, False, "a non-empty question"),
    TaskSpec("report", "Generate report", "Report", False, False,
             "nothing (the question is optional)",
             default_prompts={"image3d": "Generate radiology report for the CT.",
                              "image": "Generate radiology report for the chest X-ray."}),
    TaskSpec("describe", "Describe region", "Describe region", False, True,
             "nothing (the question is optional)",
             question_use="template",
             default_prompts=_both("What is in the region {box}? Describe it.")),
    TaskSpec("find", "Find", "Find", True, False,
             "the thing to find as the question, e.g. 'nodule'",
             question_use="target", default_prompts=_both(
                 "Where is the {question} in this image? Please output the bounding box.")),
    TaskSpec("crop_ask", "Ask about region", "Ask about region", True, True,
             "a non-empty question"),
)}
TASKS: tuple[str, ...] = tuple(TASK_SPECS)


def task_spec(name: str) -> TaskSpec:
    """The :class:`TaskSpec` of ``name``; raises :class:`TaskError` (``bad_task``) naming the
    tasks there are."""
    spec = TASK_SPECS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise TaskError(f"unknown task {name!r}; use one of {', '.join(TASKS)}")
    return spec


# ---------------------------------------------------------------------------------- answers
@dataclass
class Answer:
    """A finished answer: the data of the ``final`` SSE event, field for field (the worker's
    ``FinalEvent`` schema is generated from this class).

    boxes: ``[{"model": [...], "voxel": [...], "physical_lps": [x1, y1, z1, x2, y2, z2]}]``;
    timings in seconds (and counts); question: the question as the model saw it (the task's
    prompt, without the image).
    """

    text: str = field(metadata={"description": "the answer (box references resolved)"})
    boxes: list[dict] = field(default_factory=list, metadata={
        "description": '[{"model": [...], "voxel": [...], "physical_lps": [x1, y1, z1, x2, y2, z2]}]'})
    timings: dict[str, float] = field(default_factory=dict, metadata={
        "description": "seconds per stage (and token counts)"})
    num_tokens: int = field(default=0, metadata={"description": "generated tokens"})
    finish_reason: str = field(default="stop", metadata={
        "description": "stop | length | cancelled"})
    task: str = field(default="ask", metadata={"description": "the task that was answered"})
    question: str = field(default="", metadata={
        "description": "the question as the model saw it (without the image)"})

    @classmethod
    def from_event(cls, data: Mapping[str, Any], task: str = "ask") -> "Answer":
        """The Answer of a ``final`` event's data (missing fields keep their defaults; ``task``
        is the one asked when the event does not say)."""
        return cls(text=data.get("text", ""), boxes=data.get("boxes", []),
                   timings=data.get("timings", {}), num_tokens=int(data.get("num_tokens", 0)),
                   finish_reason=data.get("finish_reason", "stop"), task=data.get("task", task),
                   question=data.get("question", ""))

    def to_event(self) -> dict[str, Any]:
        """The data of the ``final`` event."""
        return asdict(self)

    @property
    def prompt_question(self) -> str:
        """Former name of :attr:`question` (kept for callers written before the shared schema)."""
        return self.question


#: The fields of the ``final`` event (tested against the worker's OpenAPI schema).
ANSWER_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Answer))


# ---------------------------------------------------------------------------------- boxes
def image_kind(shape: Sequence[int]) -> str:
    """``"image"`` for a 2D image ([1, H, W], [1, H, W, 3] or [H, W]), else ``"image3d"``."""
    shape = tuple(int(v) for v in shape)
    if len(shape) in (2, 4) or (len(shape) == 3 and shape[0] == 1):
        return "image"
    return "image3d"


def validate_box(box: Sequence[float], shape: Sequence[int]) -> list[float]:
    """Check a voxel box against the image it refers to; return it as floats.

    box: 3D ``(k1, j1, i1, k2, j2, i2)``, 2D ``(j1, i1, j2, i2)`` (row, column), start inclusive,
    end exclusive. shape: the uploaded array's shape ([k, j, i], [1, H, W] or [1, H, W, 3]).
    Raises :class:`BoxError` when the box has the wrong length, is not finite, is inverted or
    empty, or reaches outside the image — never reorders or clips (that would answer about a
    region the user did not draw).
    """
    kind = image_kind(shape)
    dims = [int(v) for v in shape]
    if kind == "image":
        dims = dims[-3:-1] if len(dims) == 4 else dims[-2:]
        names, n = ("j", "i"), 4
    else:
        names, n = ("k", "j", "i"), 6
    fmt = "(j1, i1, j2, i2)" if n == 4 else "(k1, j1, i1, k2, j2, i2)"
    try:
        vals = [float(v) for v in box]
    except (TypeError, ValueError):
        raise BoxError(f"the box must be {n} numbers {fmt}, got {box!r}") from None
    if len(vals) != n:
        raise BoxError(f"a box on this {'image' if n == 4 else 'volume'} has {n} numbers "
                       f"{fmt} in voxels, got {len(vals)}")
    if not all(math.isfinite(v) for v in vals):
        raise BoxError("the box contains NaN or infinity; send voxel indices")
    half = n // 2
    for axis, (lo, hi, size) in enumerate(zip(vals[:half], vals[half:], dims)):
        name = names[axis]
        if lo < 0 or hi > size:
            raise BoxError(f"the box reaches outside the image on axis {name}: {lo:g}..{hi:g}, "
                           f"the image has 0..{size}; draw the region inside the image")
        if not hi > lo:
            raise BoxError(f"the box is empty or inverted on axis {name} ({name}1={lo:g}, "
                           f"{name}2={hi:g}); give start < end")
    return vals


def validate_geometry(spacing: Sequence[float], origin: Sequence[float]) -> None:
    """Spacing within :data:`SPACING_RANGE_MM` and origins within :data:`MAX_ABS_ORIGIN_MM`.

    Raises ``MedMVLError(code="bad_geometry")``; a spacing of 1e300 mm would put boxes at
    absurd positions rather than fail.
    """
    lo, hi = SPACING_RANGE_MM
    for v in spacing:
        if not (math.isfinite(v) and lo <= v <= hi):
            raise MedMVLError(f"spacing values must be between {lo:g} and {hi:g} mm, got {v:g}; "
                              "check the image's header", code="bad_geometry")
    for v in origin:
        if not (math.isfinite(v) and abs(v) <= MAX_ABS_ORIGIN_MM):
            raise MedMVLError(f"origin values must be within +-{MAX_ABS_ORIGIN_MM:g} mm, got {v:g}",
                              code="bad_geometry")


# ---------------------------------------------------------------------------------- SSE
@dataclass
class SSEEvent:
    """One event: ``event`` name (default ``"message"``) and its ``data`` decoded from JSON."""

    event: str
    data: object


def iter_sse(stream: IO[bytes]) -> Iterator[SSEEvent]:
    """Yield events from a byte stream in the text/event-stream format.

    ``data:`` lines are joined with newlines and parsed as JSON (the worker always sends JSON);
    comment lines (``:``) are keep-alives and skipped. Raises ``ValueError`` on a non-JSON
    payload. Ends when the stream ends.
    """
    event, data_lines = "message", []
    while True:
        raw = stream.readline()
        if not raw:
            break
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data_lines:
                yield SSEEvent(event, json.loads("\n".join(data_lines)))
            event, data_lines = "message", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if value.startswith(" "):
            value = value[1:]
        if field == "event":
            event = value
        elif field == "data":
            data_lines.append(value)


def format_sse(event: str, data: object) -> bytes:
    """Encode one event (JSON data on one line)."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode("utf-8")


def error_event(code: str, message: str) -> dict:
    """The data of an SSE ``error`` event: ``{"code", "message", "status"}``."""
    return {"code": code, "message": message, "status": status_for(code)}
