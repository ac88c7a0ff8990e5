"""The panel controller shared by the Slicer module and the standalone viewer.

One controller, two thin view bindings: the view hands it voxel arrays and geometry
(:class:`VolumeData`) and calls :meth:`PanelController.run_task`; every network call runs as a
job of the controller's ``runner`` (default :class:`ThreadRunner`: a background thread; the
Slicer module uses :class:`~medmvl_core.client.qt_transport.QtRunner`: inline, with Qt
networking, no Python threads), and results come back as events on a queue that the view drains
on its GUI thread with :meth:`PanelController.poll` (a ``QTimer`` in both bindings). Listener
methods are only ever called from ``poll``, so views may touch Qt / MRML there. Standard
library + numpy.

This module holds the controller's events and the asking flow; its parts live beside it and are
re-exported here, so views import only this module: ``panel_types`` (states, ``VolumeData``,
``ChatEntry``, ``ControllerListener``, helpers), ``runners`` (``ThreadRunner``), ``worker_jobs``
(start / connect / stop / download) and ``chat_log`` (history, records, transcript).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from typing import Any, Callable, Sequence

import numpy as np

from medmvl_core import __version__  # noqa: F401  (re-exported)
from medmvl_core.client import errors, records
from medmvl_core.client.chat_log import ChatLogMixin
from medmvl_core.client.client import Answer, WorkerClient  # noqa: F401
from medmvl_core.client.launcher import WorkerLauncher
from medmvl_core.client.model_identity import ModelIdentity  # noqa: F401
from medmvl_core.client.model_kinds import (ModelKinds, WrongInputKindError, kind_problem,
                                            read_model_kinds)
# The panel's vocabulary, re-exported: views and tests use ``controller.X`` for all of it.
from medmvl_core.client.panel_types import (API_VERSION, BUSY, DEAD, DISCONNECTED,  # noqa: F401
                                            ERROR, READY, RELEASED_MODELS, STARTING, ChatEntry,
                                            ControllerListener, VolumeData, content_key,
                                            format_memory, shown_question, task_prompt_check,
                                            unique_voxel_boxes)
from medmvl_core.client.protocol import (TASK_SPECS, TASKS, BoxError,  # noqa: F401
                                         GenerationSettings, validate_box)
from medmvl_core.client.roi_geometry import as_volume_box, lps_from_ijk_to_ras  # noqa: F401
from medmvl_core.client.runners import ThreadRunner, split_progress
from medmvl_core.client.worker_jobs import WorkerJobsMixin

logger = logging.getLogger(__name__)

# The names these helpers had when they lived here.
_shown_question = shown_question
_split_progress = split_progress


class PanelController(WorkerJobsMixin, ChatLogMixin):
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

    # ------------------------------------------------------------------ asking
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
            ChatEntry("user", shown_question(task, q, box, region_label), task))
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
