"""HTTP client of the MedM-VL worker (standard library + numpy; importable in Slicer's Python).

Every request carries ``Authorization: Bearer <token>``. Connection failures before anything
was sent (worker restarting, port not yet open) are retried ``retries`` times with a short
back-off; a connection lost in the middle of an answer raises
:class:`~medmvl_core.client.errors.WorkerConnectionLostError` at once (answers are never replayed
silently).
"""

from __future__ import annotations

import http.client
import json
import logging
import socket
import time
import urllib.parse
from typing import Any, Callable, Sequence

import numpy as np

from medmvl_core.client import errors
from medmvl_core.client.protocol import (API_PREFIX, TASKS, Answer, GenerationSettings,
                                         iter_sse, task_spec, validate_geometry)

logger = logging.getLogger(__name__)

__all__ = ["Answer", "TASKS", "WorkerClient", "message_payload"]


def message_payload(task: str = "ask", question: str | None = None,
                    box: Sequence[float] | None = None,
                    generation: GenerationSettings | None = None,
                    timeout: float | None = None) -> dict[str, Any]:
    """The JSON body of ``POST /v1/sessions/{id}/messages`` (the worker's MessageIn; tested
    against its OpenAPI schema): task, question, every generation setting, box and
    ``timeout_s`` when given."""
    payload: dict[str, Any] = {"task": task, "question": question,
                               **(generation or GenerationSettings()).to_dict()}
    if box is not None:
        payload["box"] = [float(v) for v in box]
    if timeout is not None:
        payload["timeout_s"] = float(timeout)
    return payload


class WorkerClient:
    """Talks to one worker at ``url`` (``http://127.0.0.1:PORT``).

    ``timeout`` (s) bounds connecting and each read; ``ask(timeout=...)`` bounds a whole answer.
    """

    def __init__(self, url: str, token: str, timeout: float = 30.0, retries: int = 3,
                 retry_delay: float = 0.3):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise errors.WorkerError(f"bad worker URL {url!r}: use http://HOST:PORT",
                                     code="bad_url")
        self.url = url.rstrip("/")
        self._scheme, self._host = parsed.scheme, parsed.hostname
        self._port = parsed.port or (443 if parsed.scheme == "https" else 80)
        self.token = token
        self.timeout = timeout
        self.retries = retries
        self.retry_delay = retry_delay

    # ------------------------------------------------------------------ plumbing
    def _connect(self, timeout: float) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
        return cls(self._host, self._port, timeout=timeout)

    def _open(self, method: str, path: str, body: bytes | None = None,
              headers: dict[str, str] | None = None, timeout: float | None = None,
              ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send a request and return the open response; raise the typed error on HTTP >= 400."""
        hdrs = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        hdrs.update(headers or {})
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            conn = self._connect(timeout if timeout is not None else self.timeout)
            try:
                conn.request(method, API_PREFIX + path, body=body, headers=hdrs)
                resp = conn.getresponse()
            except (ConnectionRefusedError, ConnectionResetError, BrokenPipeError,
                    http.client.RemoteDisconnected) as exc:
                conn.close()
                last = exc
                # Only refused connections are certainly unsent; the others are retried because
                # every request except a question is idempotent (upload is content-addressed).
                if attempt < self.retries and (isinstance(exc, ConnectionRefusedError)
                                               or not path.endswith("/messages")):
                    time.sleep(self.retry_delay * (attempt + 1))
                    continue
                break
            except socket.timeout as exc:
                conn.close()
                raise errors.WorkerTimeoutError(
                    f"the worker at {self.url} did not answer {method} {path} in time; "
                    "it may be busy or stuck — retry, or restart it") from exc
            except OSError as exc:
                conn.close()
                last = exc
                if attempt < self.retries:
                    time.sleep(self.retry_delay * (attempt + 1))
                    continue
                break
            if resp.status >= 400:
                raw = resp.read()
                retry_after = resp.getheader("Retry-After")
                conn.close()
                exc = self._http_error(resp.status, raw)
                try:  # seconds the worker asks us to wait (429 queue_full, 503 loading)
                    exc.retry_after = float(retry_after) if retry_after else None
                except ValueError:
                    exc.retry_after = None
                raise exc
            return conn, resp
        raise errors.WorkerUnavailableError(
            f"cannot reach the worker at {self.url} ({last.__class__.__name__}: {last}); "
            "check that it is running (medmvl serve) and the URL/port") from last

    @staticmethod
    def _http_error(status: int, raw: bytes) -> errors.WorkerError:
        code, message = None, raw.decode("utf-8", "replace")[:500]
        try:
            body = json.loads(raw)
            err = body.get("error", {}) if isinstance(body, dict) else {}
            if isinstance(err, dict):
                code, message = err.get("code"), err.get("message", message)
        except ValueError:
            pass
        return errors.error_from_response(status, code, message)

    def _json(self, method: str, path: str, payload: Any = None, body: bytes | None = None,
              headers: dict[str, str] | None = None) -> Any:
        hdrs = dict(headers or {})
        if isinstance(body, memoryview):
            hdrs["Content-Length"] = str(body.nbytes)
        if payload is not None:
            body = json.dumps(payload).encode("utf-8")
            hdrs["Content-Type"] = "application/json"
        conn, resp = self._open(method, path, body, hdrs)
        try:
            raw = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise errors.WorkerConnectionLostError(
                f"connection to the worker lost while reading {path}: {exc}") from exc
        finally:
            conn.close()
        return json.loads(raw) if raw else None

    # ------------------------------------------------------------------ API
    def health(self) -> dict:
        """``{"status": "loading"|"ready"|"error", "model", "device", "memory", "version", "api"}``."""
        return self._json("GET", "/health")

    def wait_ready(self, timeout: float = 120.0, poll: float = 0.2) -> dict:
        """Poll health until the model is loaded; raise on load failure or timeout."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                h = self.health()
                if h.get("status") == "ready":
                    return h
                if h.get("status") == "error":
                    raise errors.LaunchError(f"the worker failed to load the model: {h.get('error')}")
            except errors.WorkerUnavailableError:
                pass
            if time.monotonic() > deadline:
                raise errors.WorkerTimeoutError(
                    f"the worker at {self.url} was not ready after {timeout:.0f} s")
            self._pause(poll)

    def _pause(self, seconds: float) -> None:
        """Wait between health polls (the Qt client processes GUI events meanwhile)."""
        time.sleep(seconds)

    def upload_volume(self, array: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                      origin: Sequence[float] = (0.0, 0.0, 0.0),
                      direction: Sequence[Sequence[float]] | Sequence[float] | None = None,
                      modality: str = "CT") -> str:
        """Upload a volume or image once; returns its id (content hash; re-upload is a no-op).

        array: [k, j, i] (slice, row, column) for a volume, [1, H, W] or [1, H, W, 3] for a 2D
        image. spacing/origin in (i, j, k) order, mm, LPS; direction 3x3 (columns = axes).
        """
        arr = np.asarray(array)
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        arr = np.ascontiguousarray(arr)
        try:  # fail here rather than after sending the whole array
            validate_geometry([float(v) for v in spacing], [float(v) for v in origin])
        except errors.MedMVLError as exc:
            raise errors.BadRequestError(str(exc), code="bad_geometry") from None
        if direction is None:
            direction = np.eye(3)
        meta = {
            "dtype": arr.dtype.name,
            "shape": list(arr.shape),
            "spacing": [float(v) for v in spacing],
            "origin": [float(v) for v in origin],
            "direction": np.asarray(direction, dtype=float).reshape(-1).tolist(),
            "modality": modality,
        }
        # a view of the array's bytes, not a copy (a 1 GB volume is not doubled in memory)
        body = memoryview(arr.reshape(-1)).cast("B") if arr.size else b""
        out = self._json("POST", "/volumes", body=body, headers={
            "Content-Type": "application/octet-stream", "X-MedMVL-Meta": json.dumps(meta)})
        return out["volume_id"]

    def create_session(self, volume_id: str) -> str:
        """Open a conversation about an uploaded volume; returns the session id."""
        return self._json("POST", "/sessions", {"volume_id": volume_id})["session_id"]

    def delete_session(self, session_id: str) -> None:
        self._json("DELETE", f"/sessions/{urllib.parse.quote(session_id)}")

    def delete_volume(self, volume_id: str) -> None:
        self._json("DELETE", f"/volumes/{urllib.parse.quote(volume_id)}")

    def cancel(self, session_id: str) -> bool:
        """Cancel the answer running (or queued) in a session; True when one was cancelled."""
        out = self._json("POST", f"/sessions/{urllib.parse.quote(session_id)}/cancel", {})
        return bool(out.get("cancelled"))

    def ask(self, session_id: str, task: str = "ask", question: str | None = None,
            box: Sequence[float] | None = None, on_token: Callable[[str], None] | None = None,
            *, generation: GenerationSettings | None = None, timeout: float | None = None,
            **settings: Any) -> Answer:
        """Ask one question and stream the answer.

        box: voxel box ``(k1, j1, i1, k2, j2, i2)`` (inclusive-exclusive) for describe/crop_ask.
        on_token(text_piece) is called for each streamed piece. generation: the decoding
        settings (default :class:`GenerationSettings`); ``settings``: any of them by name
        (``max_new_tokens=64, do_sample=True, top_k=20, seed=0``), applied over
        ``generation``. ``timeout`` bounds the whole answer (the worker stops at the same
        limit). The worker checks the values; an unknown task or setting name raises here.
        Raises a typed :class:`~medmvl_core.client.errors.WorkerError` on any failure.
        """
        try:
            task_spec(task)
            gen = (generation or GenerationSettings()).replace(**settings)
        except errors.MedMVLError as exc:  # protocol.TaskError / SettingsError
            raise errors.BadRequestError(str(exc), code=exc.code) from None
        payload = message_payload(task, question, box, gen, timeout)
        read_timeout = max(self.timeout, (timeout or 0) + 5.0)
        conn, resp = self._open(
            "POST", f"/sessions/{urllib.parse.quote(session_id)}/messages",
            json.dumps(payload).encode("utf-8"),
            {"Content-Type": "application/json", "Accept": "text/event-stream"},
            timeout=read_timeout)
        try:
            for ev in iter_sse(resp):
                data = ev.data if isinstance(ev.data, dict) else {}
                if ev.event == "token":
                    if on_token is not None:
                        on_token(data.get("text", ""))
                elif ev.event == "final":
                    return Answer.from_event(data, task)
                elif ev.event == "error":
                    raise errors.error_from_response(
                        int(data.get("status", 500)), data.get("code"), data.get("message", ""))
        except socket.timeout as exc:
            raise errors.WorkerTimeoutError(
                f"no data from the worker for {read_timeout:.0f} s while answering") from exc
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise errors.WorkerConnectionLostError(
                f"the connection to the worker was lost during the answer ({exc}); the worker "
                "may have crashed — restart it and ask again") from exc
        finally:
            conn.close()
        raise errors.WorkerConnectionLostError(
            "the worker closed the answer stream without a final event; it may have crashed — "
            "restart it and ask again")
