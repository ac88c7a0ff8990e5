"""The panel controller shared by the Slicer module and the standalone viewer.

One controller, two thin view bindings: the view hands it voxel arrays and geometry
(:class:`VolumeData`) and calls :meth:`PanelController.run_task`; every network call runs as a
job of the controller's ``runner`` (default :class:`ThreadRunner`: a background thread; the
Slicer module uses :class:`~medmvl_core.client.qt_transport.QtRunner`: inline, with Qt
networking, no Python threads), and results come back as events on a queue that the view drains
on its GUI thread with :meth:`PanelController.poll` (a ``QTimer`` in both bindings). Listener
methods are only ever called from ``poll``, so views may touch Qt / MRML there. Standard
library + numpy.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from medmvl_core import __version__
from medmvl_core.client import errors, records
from medmvl_core.client.client import Answer, WorkerClient
from medmvl_core.client.launcher import WorkerLauncher
from medmvl_core.client.model_identity import ModelIdentity
from medmvl_core.client.protocol import (TASK_SPECS, TASKS, BoxError, GenerationSettings,
                                         validate_box)
from medmvl_core.client.model_kinds import ModelKinds, WrongInputKindError, kind_problem, read_model_kinds
from medmvl_core.client.roi_geometry import as_volume_box, lps_from_ijk_to_ras

logger = logging.getLogger(__name__)

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


class ThreadRunner:
    """Runs the controller's jobs on daemon threads (``job`` returns an unstarted
    ``threading.Thread``) and pauses with ``time.sleep``. Another runner (``QtRunner``) gives
    objects with the same ``start`` / ``is_alive``."""

    def job(self, target: Callable[[], None], name: str) -> Any:
        return threading.Thread(target=target, name=name, daemon=True)

    def pause(self, seconds: float) -> None:
        time.sleep(seconds)


class PanelController:
    """State, history and background work of the MedM-VL panel (see the module docstring)."""

    def __init__(self, listener: ControllerListener | None = None,
                 launcher_factory: Callable[..., WorkerLauncher] = WorkerLauncher,
                 client_factory: Callable[..., WorkerClient] = WorkerClient,
                 runner: Any = None):
        self.runner = runner or ThreadRunner()
        self.listener = listener or ControllerListener()
        self._launcher_factory = launcher_factory
        self._client_factory = client_factory
        self.launcher: WorkerLauncher | None = None
        self.client: WorkerClient | None = None
        self.state, self.detail = DISCONNECTED, ""
        self.health: dict = {}
        self.histories: dict[str, list[ChatEntry]] = {}
        #: how answers are decoded (sent with every question, stored in the records)
        self.generation = GenerationSettings()
        self._events: queue.Queue = queue.Queue()
        self._thread: Any = None  # the running job (a Thread, or the runner's equivalent)
        self._uploads: dict[str, tuple[str, str, str | None]] = {}  # key -> (fingerprint, vid, sid)
        self._session: str | None = None
        self._cancel = threading.Event()
        self._download: subprocess.Popen | None = None
        self._partial: dict[str, str] = {}
        #: volume key -> the question (or task label) last asked: names found boxes/ROIs.
        self.last_question: dict[str, str] = {}
        #: volume key -> the conversation's records (model identity, settings, times, boxes)
        self.conversations: dict[str, records.Conversation] = {}
        self._pending: dict[str, dict] = {}
        self._atexit = False
        #: what the local worker's checkpoint takes (from its config.json, read before it starts)
        self.model_kinds: ModelKinds | None = None

    @property
    def max_new_tokens(self) -> int:
        """Shorthand for ``generation.max_new_tokens`` (the setting a panel changes most)."""
        return self.generation.max_new_tokens

    @max_new_tokens.setter
    def max_new_tokens(self, value: int) -> None:
        self.generation.max_new_tokens = value

    # ------------------------------------------------------------------ events
    def _emit(self, kind: str, *args: Any) -> None:
        self._events.put((kind, args))

    def poll(self) -> int:
        """Drain queued events into the listener (call on the GUI thread). Returns the count."""
        n = 0
        while True:
            try:
                kind, args = self._events.get_nowait()
            except queue.Empty:
                break
            n += 1
            self._dispatch(kind, args)
        if self.launcher is not None and self.state in (READY, BUSY) and not self.launcher.running():
            self._set_state(DEAD, "the worker process exited; press Start to restart it\n"
                            + self.launcher.log_tail(5))
        return n

    def _dispatch(self, kind: str, args: tuple) -> None:
        lst = self.listener
        if kind == "state":
            state, detail = args
            if state == READY and self.client is None:  # stopped while the job ran
                state, detail = DISCONNECTED, ""
            self._set_state(state, detail)
        elif kind == "health":
            self.health = args[0]
            lst.on_health(args[0])
        elif kind == "token":
            key, piece = args
            self._partial[key] = self._partial.get(key, "") + piece
            lst.on_token(key, piece)
        elif kind == "answer":
            key, ans = args
            self._partial.pop(key, None)
            self.histories.setdefault(key, []).append(
                ChatEntry("assistant", ans.text, ans.task, list(ans.boxes)))
            self._record(key, ans)
            lst.on_answer(key, ans)
        elif kind == "error":
            key, message = args
            if key is not None:
                self._partial.pop(key, None)
                self.histories.setdefault(key, []).append(ChatEntry("error", message))
            lst.on_error(key, message)
        elif kind == "progress":
            lst.on_progress(*args)

    def _set_state(self, state: str, detail: str = "") -> None:
        self.state, self.detail = state, detail
        self.listener.on_state(state, detail)

    def busy(self) -> bool:
        """True while a background job runs."""
        return self._thread is not None and self._thread.is_alive()

    def idle(self) -> bool:
        """True when no job runs and every event has been dispatched to the listener."""
        return not self.busy() and self._events.empty()

    def wait(self, timeout: float = 600.0) -> None:
        """Block until the background job ends, dispatching events (for scripts and tests)."""
        deadline = time.monotonic() + timeout
        while self.busy():
            if time.monotonic() > deadline:
                raise errors.WorkerTimeoutError(f"the job did not finish within {timeout:.0f} s")
            self.poll()
            time.sleep(0.02)
        self.poll()

    def _run(self, name: str, fn: Callable[[], None]) -> None:
        if self.busy():
            raise errors.ConflictError("the panel is busy; wait for the answer or press Cancel",
                                       code="panel_busy")

        def body() -> None:
            try:
                fn()
            except errors.MedMVLError as exc:
                self._fail(exc)
            except Exception as exc:  # a bug must not kill the thread silently
                logger.exception("%s failed", name)
                self._fail(exc)

        self._thread = self.runner.job(body, f"medmvl-{name}")
        self._thread.start()

    def _fail(self, exc: Exception, key: str | None = None) -> None:
        message = str(exc) or exc.__class__.__name__
        dead = isinstance(exc, (errors.WorkerUnavailableError, errors.LaunchError))
        self._emit("error", key, message)
        if dead and self.launcher is not None and not self.launcher.running():
            self._emit("state", DEAD, message)
        elif dead:
            self._emit("state", ERROR, message)
        else:
            self._emit("state", READY if self.client is not None else DISCONNECTED, "")

    # ------------------------------------------------------------------ worker
    def _check_health(self, client: WorkerClient) -> dict:
        h = client.health()
        if int(h.get("api", -1)) != API_VERSION:
            raise errors.WorkerError(
                f"the worker speaks API {h.get('api')!r}, this panel speaks {API_VERSION}; "
                "install matching versions of the worker and the module", code="api_mismatch")
        if h.get("version") and str(h["version"]).split(".")[:2] != __version__.split(".")[:2]:
            logger.warning("worker version %s differs from client %s", h["version"], __version__)
        return h

    def start_local(self, python: str, checkpoint: str, device: str = "auto",
                    quantize: str = "auto", env: dict[str, str] | None = None) -> None:
        """Start (or restart) a local worker in the background."""
        if not checkpoint or not os.path.isdir(checkpoint):
            raise errors.LaunchError(f"checkpoint folder {checkpoint!r} does not exist; choose a "
                                     "model folder or download a released model", code="bad_argument")
        self.stop()
        has_config = os.path.isfile(os.path.join(checkpoint, "config.json"))
        self.model_kinds = read_model_kinds(checkpoint) if has_config else None  # else the worker reports it
        if not self._atexit:
            atexit.register(self.shutdown)  # never leave a worker behind
            self._atexit = True
        self._set_state(STARTING, f"starting the worker on {device}")

        def job() -> None:
            t0 = time.monotonic()
            launcher = self._launcher_factory(python=python or sys.executable,
                                              checkpoint=checkpoint, device=device,
                                              quantize=quantize, env=env)
            self.launcher = launcher
            client = launcher.start()
            h = self._check_health(client)
            self.client, self._uploads = client, {}
            logger.info("worker ready in %.1f s (device %s)", time.monotonic() - t0, h.get("device"))
            self._emit("health", h)
            self._emit("state", READY, f"{h.get('model', '')} on {h.get('device', '?')}")

        self._run("start", job)

    def connect_remote(self, url: str, token: str) -> None:
        """Use a running worker (token kept in memory only); checks health in the background."""
        self.stop()
        self._set_state(STARTING, f"connecting to {url}")

        def job() -> None:
            client = self._client_factory(url, token)
            h = self._check_health(client)
            if h.get("status") != "ready":
                client.wait_ready(timeout=300)
                h = self._check_health(client)
            self.client, self._uploads = client, {}
            self._emit("health", h)
            self._emit("state", READY, f"{h.get('model', '')} on {h.get('device', '?')} at {url}")

        self._run("connect", job)

    def stop(self) -> None:
        """Stop the local worker (if this panel started one) and forget the connection."""
        self._cancel.set()
        if self.launcher is not None:
            # close() also removes the launcher's temporary folder (token, log).
            getattr(self.launcher, "close", self.launcher.stop)()
            self.launcher = None
        self.client, self._uploads, self.health, self.model_kinds = None, {}, {}, None
        if self.state != DISCONNECTED:
            self._set_state(DISCONNECTED, "")

    def shutdown(self) -> None:
        """Stop everything (application exit)."""
        if self._download is not None and self._download.poll() is None:
            self._download.kill()
        self.stop()

    # ------------------------------------------------------------------ download
    def download(self, python: str, repo_id: str, local_dir: str,
                 env: dict[str, str] | None = None) -> None:
        """Run ``medmvl download REPO_ID --local-dir DIR`` in the worker's interpreter (with
        ``env``, e.g. Slicer's startup environment), with progress events from its output."""
        cmd = [python or sys.executable, "-m", "medmvl_core.cli", "download", repo_id,
               "--local-dir", local_dir]
        self._emit("progress", f"downloading {repo_id}", 0.0)

        def job() -> None:
            # Output goes to a temporary file read as it grows (never a pipe that could fill up
            # while nobody reads it), so the same loop serves threads and the inline Qt runner.
            with tempfile.TemporaryFile() as out:
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, env=env)
                self._download = proc
                tail: list[str] = []
                for line in _split_progress(out, proc.poll, self.runner.pause):
                    tail = (tail + [line])[-5:]
                    pct = re.findall(r"(\d{1,3})%", line)
                    self._emit("progress", line[-120:], int(pct[-1]) / 100.0 if pct else None)
            if proc.wait() != 0:
                raise errors.WorkerError(f"download of {repo_id} failed:\n" + "\n".join(tail),
                                         code="download_failed")
            self._emit("progress", f"downloaded {repo_id} to {local_dir}", 1.0)

        self._run("download", job)

    # ------------------------------------------------------------------ asking
    def history(self, key: str) -> list[ChatEntry]:
        return list(self.histories.get(key, []))

    def model_identity(self) -> ModelIdentity:
        """The connected model's name, revision/hash and intended use (from health)."""
        return ModelIdentity.from_health(self.health)

    def _record(self, key: str, ans: Answer) -> None:
        p = self._pending.pop(key, None)
        conv = self.conversations.get(key)
        if p is None or conv is None:
            return
        status = "cancelled" if ans.finish_reason == "cancelled" else "answered"
        conv.turns.append(records.Turn(
            task=p["task"], question=p["question"], answer=ans.text, model=self.model_identity(),
            generation={**p["generation"].to_dict(), "finish_reason": ans.finish_reason,
                        "num_tokens": ans.num_tokens},
            asked_at=p["asked_at"], answered_at=records.now_iso(), region=p["region"],
            boxes=records.found_boxes(ans.boxes, p["label"]), status=status))

    def restore(self, key: str, conversation: records.Conversation) -> None:
        """Show a stored conversation (e.g. from a loaded scene) as the volume's history.
        The worker does not see restored turns: the next question starts a new session."""
        self.conversations[key] = conversation
        entries: list[ChatEntry] = []
        for t in conversation.turns:
            box = t.region.voxel if t.region is not None else None
            entries.append(ChatEntry("user", _shown_question(t.task, t.question, box), t.task))
            entries.append(ChatEntry("assistant", t.answer, t.task,
                                     [{"voxel": b.voxel, "model": b.model,
                                       "physical_lps": b.physical_lps} for b in t.boxes]))
        self.histories[key] = entries

    def clear_history(self, key: str) -> None:
        """Forget the volume's conversation here and on the worker: the next question starts a
        new worker session (the uploaded volume is kept), so the model no longer sees the
        cleared turns and they stop taking room in its context."""
        self.histories.pop(key, None)
        self.conversations.pop(key, None)
        cached = self._uploads.get(key)
        if cached is not None:
            self._uploads[key] = (cached[0], cached[1], None)
            old, client = cached[2], self.client
            # Free the old conversation on the worker now (its KV cache and turns), in the
            # background so the panel never waits on the network. Not while it is answering: that
            # answer finishes (or is cancelled) first and the worker's idle eviction frees it.
            if old is not None and client is not None and old != self._session:
                self.runner.job(lambda: self._forget_session(client, old), "medmvl-forget").start()

    @staticmethod
    def _forget_session(client: WorkerClient, session_id: str) -> None:
        try:
            client.delete_session(session_id)
        except errors.WorkerError as exc:  # gone already (evicted, worker restarted): fine
            logger.info("delete of a cleared session: %s", exc)

    def transcript(self, key: str) -> str:
        """The volume's conversation as plain text (Copy / Save)."""
        names = {"user": "You", "assistant": "MedM-VL", "error": "Error"}
        return "\n\n".join(f"{names.get(e.role, e.role)}: {e.text}"
                           + ("" if e.in_context else "  (no longer in the model's context)")
                           for e in self.history(key))

    def partial(self, key: str) -> str:
        """The answer streamed so far (while busy)."""
        return self._partial.get(key, "")

    def input_problem(self, volume: VolumeData | Sequence[int], checkpoint: str | None = None) -> str | None:
        """Why the model cannot take ``volume`` (or an array of that shape: a view may pass the shape
        alone, without reading the voxels) (a message that names the model's kind and the model
        that fits), or None when it can or its kinds are unknown. The model is the running worker's
        (its checkpoint's config, or the kinds its health reports); without a worker, ``checkpoint``'s,
        read from its config.json: nothing is started to find out."""
        if self.client is not None:
            kinds = self.model_kinds
            if kinds is None and self.health.get("kinds"):
                kinds = ModelKinds(str(self.health.get("model") or "the worker"), tuple(self.health["kinds"]))
        elif checkpoint and os.path.isfile(os.path.join(checkpoint, "config.json")):
            try:
                kinds = read_model_kinds(checkpoint)
            except errors.LaunchError:
                return None  # an unreadable config is reported when the worker starts
        else:
            kinds = None
        shape = np.shape(volume.array) if isinstance(volume, VolumeData) else tuple(volume)
        return kind_problem(kinds, shape) if kinds is not None else None

    def run_task(self, volume: VolumeData, task: str, question: str | None = None,
                 box: Sequence[int] | None = None, region_source: str = "drawn",
                 region_label: str = "") -> None:
        """Ask the worker about ``volume`` in the background; events stream to the listener.
        ``region_source`` / ``region_label`` name the box in the records ("drawn" ROI or
        "segment" and its name)."""
        if self.client is None:
            raise errors.WorkerUnavailableError("no worker: start a local worker or connect to "
                                                "a remote one first")
        problem = self.input_problem(volume)
        if problem:  # refused here, before anything is uploaded
            raise WrongInputKindError(problem)
        task_prompt_check(task, question, box)
        try:
            generation = self.generation.replace().validate()  # this question's own copy
        except errors.MedMVLError as exc:
            raise errors.BadRequestError(str(exc), code=exc.code) from None
        if box is not None:  # the worker's own check, before anything is sent
            try:
                validate_box(box, np.shape(volume.array))
            except BoxError as exc:
                raise errors.BadRequestError(str(exc), code="bad_box") from None
        label = TASK_SPECS[task].label
        q = (question or "").strip()
        self.histories.setdefault(volume.key, []).append(
            ChatEntry("user", _shown_question(task, q, box), task))
        self.last_question[volume.key] = question.strip() if question and question.strip() else label
        conv = self.conversations.setdefault(volume.key, records.Conversation())
        conv.volume = records.VolumeRef(
            key=volume.key, shape=[int(s) for s in volume.array.shape],
            ijk_to_lps=(np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(volume.ijk_to_ras, float)).tolist(),
            modality=volume.modality, dicom=dict(volume.dicom or {}))
        self._pending[volume.key] = {
            "task": task, "question": q, "asked_at": records.now_iso(),
            "generation": generation, "label": self.last_question[volume.key],
            "region": None if box is None else records.BoxRecord(
                voxel=[int(v) for v in box], source=region_source, label=region_label)}
        self._cancel.clear()
        self._set_state(BUSY, f"{label}…")
        client = self.client

        def job() -> None:
            try:
                self._ask(client, volume, task, question, box, generation)
            except errors.MedMVLError as exc:
                if isinstance(exc, errors.CancelledError) or self._cancel.is_set():
                    self._emit("error", volume.key, "cancelled")
                    self._emit("state", READY, "cancelled")
                else:
                    self._fail(exc, volume.key)

        self._run("ask", job)

    def _session_for(self, client: WorkerClient, volume: VolumeData, fresh: bool) -> str:
        fp = content_key(volume.array)
        cached = self._uploads.get(volume.key)
        if cached and cached[0] == fp and not fresh:
            if cached[2] is None:  # the chat was cleared: a new conversation on the same upload
                sid = client.create_session(cached[1])
                self._uploads[volume.key] = (fp, cached[1], sid)
                return sid
            return cached[2]
        t0 = time.monotonic()
        spacing, origin, direction = lps_from_ijk_to_ras(volume.ijk_to_ras)
        self._emit("progress", "uploading the volume", None)
        vid = client.upload_volume(volume.array, spacing, origin, direction, modality=volume.modality)
        sid = client.create_session(vid)
        self._uploads[volume.key] = (fp, vid, sid)
        logger.info("stage upload+session: %.2f s (%s voxels)", time.monotonic() - t0,
                    "x".join(str(s) for s in volume.array.shape))
        return sid

    def _ask(self, client: WorkerClient, volume: VolumeData, task: str, question: str | None,
             box: Sequence[int] | None, generation: GenerationSettings) -> None:
        t0 = time.monotonic()
        for attempt in (0, 1):
            sid = self._session_for(client, volume, fresh=attempt > 0)
            self._session = sid
            if self._cancel.is_set():
                raise errors.CancelledError("cancelled")
            self._emit("progress", "answering", None)
            try:
                ans = client.ask(sid, task=task, question=question,
                                 box=None if box is None else [int(v) for v in box],
                                 on_token=lambda piece: self._emit("token", volume.key, piece),
                                 generation=generation)
                break
            except errors.SessionEvictedError as exc:
                raise self._conversation_lost(volume.key, exc) from None
            except errors.NotFoundError:
                if attempt:  # the worker restarted or evicted the volume: upload once more
                    raise
                logger.info("session unknown to the worker; uploading again")
        self._session = None
        timings = dict(ans.timings)
        timings["client_total_s"] = round(time.monotonic() - t0, 3)
        logger.info("stage timings for %s: %s", task,
                    ", ".join(f"{k}={v}" for k, v in sorted(timings.items())))
        if ans.finish_reason == "cancelled" or self._cancel.is_set():
            self._emit("answer", volume.key, ans)
            self._emit("state", READY, "cancelled")
            return
        self._emit("answer", volume.key, ans)
        self._emit("progress", "done", 1.0)
        try:  # memory after the answer, for the panel
            self._emit("health", client.health())
        except errors.WorkerError as exc:
            logger.info("health after answer: %s", exc)
        self._emit("state", READY, f"answered in {timings['client_total_s']:.1f} s")

    def _conversation_lost(self, key: str, exc: errors.SessionEvictedError) -> errors.WorkerError:
        """The worker closed the session (cap or volume eviction): never re-open one silently.
        Mark the visible turns as out of the model's context, forget the session (and, for an
        evicted volume, the upload), and return the error the panel shows."""
        for entry in self.histories.get(key, []):
            entry.in_context = False
        cached = self._uploads.get(key)
        if cached is not None:
            if exc.code == "volume_evicted":
                self._uploads.pop(key, None)
            else:
                self._uploads[key] = (cached[0], cached[1], None)
        return errors.SessionEvictedError(
            "The worker closed this conversation (" + ("its copy of the image was evicted"
            if exc.code == "volume_evicted" else "too many open sessions") + "): the turns above "
            "are no longer in the model's context. Ask again to start over with this image.",
            code=exc.code, status=exc.status)

    def cancel(self) -> None:
        """Stop the running answer (the worker stops generating) or the download."""
        self._cancel.set()
        if self._download is not None and self._download.poll() is None:
            self._download.kill()
        sid, client = self._session, self.client
        if sid and client is not None:
            def job() -> None:
                try:
                    client.cancel(sid)
                except errors.WorkerError as exc:  # the answer may just have ended
                    logger.info("cancel: %s", exc)

            self.runner.job(job, "medmvl-cancel").start()


def _shown_question(task: str, question: str, box: Sequence[int] | None) -> str:
    """The user's line in the transcript: the question, the task's label, the region."""
    spec = TASK_SPECS.get(task)
    label = spec.label if spec is not None else task
    shown = question if task == "ask" else (f"{label}: {question}" if question else label)
    if box is not None:
        shown += f"  [box {list(int(v) for v in box)}]"
    return shown


def _split_progress(out, finished: Callable[[], Any], pause: Callable[[float], None],
                    ) -> Iterator[str]:
    """Lines written to the file ``out`` by a running subprocess, also split on carriage returns
    (tqdm redraws), until ``finished()`` returns not None and the file is read to its end."""
    buf, pos = b"", 0
    while True:
        done = finished() is not None  # checked before reading: nothing written after is lost
        out.seek(pos)
        chunk = out.read()
        pos += len(chunk)
        buf += chunk
        parts = re.split(rb"[\r\n]", buf)
        buf = parts.pop()
        for p in parts:
            if p.strip():
                yield p.decode("utf-8", "replace").strip()
        if done:
            break
        if not chunk:
            pause(0.1)
    if buf.strip():
        yield buf.decode("utf-8", "replace").strip()
