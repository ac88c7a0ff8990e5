"""The worker's HTTP API (FastAPI), versioned under ``/v1``.

GET  /v1/health                      status, model, device, memory, version, api
POST /v1/volumes                     body: raw little-endian array bytes; header X-MedMVL-Meta:
                                     {"dtype", "shape", "spacing", "origin", "direction", "modality"}
                                     -> {"volume_id", "created"} (id = content hash; idempotent)
DELETE /v1/volumes/{id}
POST /v1/sessions                    {"volume_id"} -> {"session_id"}
DELETE /v1/sessions/{id}
POST /v1/sessions/{id}/messages      {"task", "question", "box", "max_new_tokens", "do_sample",
                                      "temperature", "top_p", "seed", "timeout_s"}
                                     -> text/event-stream: "queued", "token" {"text"}*, then
                                     "final" {"text", "boxes", "timings", ...} or "error"
POST /v1/sessions/{id}/cancel        -> {"cancelled": bool}

Errors are ``{"error": {"code", "message"}}`` with a 4xx/5xx status. Every request needs
``Authorization: Bearer <token>`` (compared in constant time).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field

from medmvl_core import __version__
from medmvl_core.client.sse import format_sse
from medmvl_core.engine.errors import NotFoundError, RequestError, SessionBusyError
from medmvl_core.engine.tasks import TASKS
from medmvl_core.errors import MedMVLError
from medmvl_core.worker.jobs import STATUS_BY_CODE, Job
from medmvl_core.worker.state import WorkerState

logger = logging.getLogger(__name__)

API_VERSION = 1


class SessionIn(BaseModel):
    volume_id: str = Field(min_length=1, max_length=128)


class MessageIn(BaseModel):
    task: str = "ask"
    question: str | None = None
    box: list[float] | None = None
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    timeout_s: float | None = None


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def _status_for(exc: MedMVLError) -> int:
    if isinstance(exc, NotFoundError):
        return 404
    if isinstance(exc, SessionBusyError):
        return 409
    return STATUS_BY_CODE.get(exc.code, 400)


def _memory(state: WorkerState) -> dict:
    out: dict[str, Any] = {"volumes_bytes": state.volumes.used_bytes}
    eng = state.engine
    if eng is not None:
        out["image_cache_bytes"] = eng.images.used_bytes
        out["kv_cache_bytes"] = eng.kv_bytes_used()
        from medmvl_core.worker.admission import kv_report
        out.update(kv_report(eng))  # budget in tokens at the loaded model's real per-token size
        if eng.device.type == "cuda":
            import torch
            out["cuda_allocated_bytes"] = int(torch.cuda.memory_allocated(eng.device))
            out["cuda_reserved_bytes"] = int(torch.cuda.memory_reserved(eng.device))
    try:
        import resource
        out["max_rss_bytes"] = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (ImportError, OSError):
        pass
    return out


def create_app(state: WorkerState) -> FastAPI:
    """Build the FastAPI app around a :class:`WorkerState`."""
    app = FastAPI(title="MedM-VL worker", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.worker = state
    token = state.settings.token.encode()

    @app.middleware("http")
    async def auth(request: Request, call_next):
        header = request.headers.get("authorization", "")
        given = header[7:].encode() if header.lower().startswith("bearer ") else b""
        if not token or not hmac.compare_digest(given, token):
            return error_response(401, "unauthorized", "missing or wrong token: send "
                                  "'Authorization: Bearer <token>' (see the worker's token file)")
        return await call_next(request)

    @app.exception_handler(MedMVLError)
    async def medmvl_error(_request: Request, exc: MedMVLError):
        return error_response(_status_for(exc), exc.code, str(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError):
        errs = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errs):
            return error_response(400, "malformed_json", "the request body is not valid JSON")
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'body'}: {e.get('msg')}"
                 for e in errs[:5]]
        return error_response(422, "invalid_request", "; ".join(parts))

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception):
        logger.exception("unexpected error")
        return error_response(500, "internal", "internal error; see the worker log")

    def need_engine():
        if state.engine is None:
            msg = ("the model is still loading; retry in a moment" if state.status == "loading"
                   else f"the model failed to load: {state.error}")
            raise MedMVLError(msg, code="loading")
        return state.engine

    @app.get("/v1/health")
    async def health():
        return {"status": state.status, "model": state.settings.model_name,
                "device": state.device, "memory": _memory(state), "version": __version__,
                "api": API_VERSION, "error": state.error, "queue_waiting": state.queue.waiting,
                "busy": state.queue.running is not None,
                "kinds": list(getattr(state.engine, "kinds", ()))}

    @app.post("/v1/volumes")
    async def upload(request: Request):
        from medmvl_core.worker.volumes import parse_meta
        meta = parse_meta(request.headers.get("x-medmvl-meta"))
        limit = state.settings.max_upload_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise MedMVLError(f"upload of {int(declared)} bytes exceeds the limit of {limit} "
                              "bytes; downsample or crop the volume", code="too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise MedMVLError(f"upload exceeds the limit of {limit} bytes", code="too_large")
            chunks.append(chunk)
        vid, created = await asyncio.to_thread(state.volumes.add, b"".join(chunks), meta)
        logger.info("volume %s %s (%s %s)", vid[:8], "stored" if created else "already present",
                    meta["dtype"], meta["shape"])
        return {"volume_id": vid, "created": created}

    @app.delete("/v1/volumes/{vid}")
    async def delete_volume(vid: str):
        state.volumes.delete(vid)
        return {"deleted": True}

    @app.post("/v1/sessions")
    async def create_session(body: SessionIn):
        eng = need_engine()
        vol = state.volumes.get(body.volume_id)
        if len(eng.sessions) >= state.settings.max_sessions:
            eng.evict_idle_sessions(state.settings.max_sessions - 1)
        if len(eng.sessions) >= state.settings.max_sessions:
            raise RequestError(f"too many sessions ({state.settings.max_sessions}) are answering; "
                               "retry later", code="too_many_sessions")
        s = eng.create_session(vol, volume_id=body.volume_id)
        return {"session_id": s.id, "volume_id": body.volume_id}

    @app.delete("/v1/sessions/{sid}")
    async def delete_session(sid: str):
        eng = need_engine()
        job = state.active.get(sid)
        if job is not None:
            job.cancel.set()
        eng.delete_session(sid)
        return {"deleted": True}

    @app.post("/v1/sessions/{sid}/cancel")
    async def cancel(sid: str):
        eng = need_engine()
        eng.get_session(sid)
        job = state.active.get(sid)
        if job is None or job.done.is_set():
            return {"cancelled": False}
        job.cancel.set()
        return {"cancelled": True}

    @app.post("/v1/sessions/{sid}/messages")
    async def message(sid: str, body: MessageIn):
        eng = need_engine()
        session = eng.get_session(sid)
        st = state.settings
        if body.task not in TASKS:
            raise RequestError(f"unknown task {body.task!r}; use one of {', '.join(TASKS)}",
                               code="bad_task")
        q = body.question or ""
        if body.task in ("ask", "crop_ask", "find") and not q.strip():
            raise RequestError(f"task {body.task!r} needs a non-empty question", code="empty_question")
        if len(q) > st.max_question_chars:
            raise RequestError(f"the question has {len(q)} characters; the limit is "
                               f"{st.max_question_chars}", code="question_too_long")
        if not 1 <= body.max_new_tokens <= st.max_new_tokens:
            raise RequestError(f"max_new_tokens must be in 1..{st.max_new_tokens}",
                               code="bad_max_new_tokens")
        if body.box is not None and not all(abs(v) < 1e9 for v in body.box):
            raise RequestError("box values must be finite voxel indices", code="bad_box")
        timeout = min(body.timeout_s or st.request_timeout_s, st.request_timeout_s)
        if timeout <= 0:
            raise RequestError("timeout_s must be > 0", code="bad_timeout")

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(event: str, data: dict) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, (event, data))
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                job.cancel.set()

        def make_request(job: Job):
            from medmvl_core.engine import Request
            return Request(session=session, question=body.question, task=body.task, box=body.box,
                           max_new_tokens=body.max_new_tokens, do_sample=body.do_sample,
                           temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                           seed=body.seed, on_token=lambda piece: emit("token", {"text": piece}),
                           cancel=job.cancel, deadline=job.deadline)

        def to_final(job: Job, ans) -> dict:
            timings = dict(ans.timings)
            timings["queue_s"] = (job.started or job.enqueued) - job.enqueued
            return {"text": ans.text, "boxes": ans.boxes, "timings": timings,
                    "num_tokens": len(ans.token_ids), "finish_reason": ans.finish_reason,
                    "task": ans.task, "question": ans.question}

        def run(job: Job) -> dict:
            r = make_request(job)
            ans = eng.answer(session=r.session, question=r.question, task=r.task, box=r.box,
                             max_new_tokens=r.max_new_tokens, do_sample=r.do_sample,
                             temperature=r.temperature, top_p=r.top_p, top_k=r.top_k,
                             seed=r.seed, on_token=r.on_token, cancel=r.cancel,
                             deadline=r.deadline)
            return to_final(job, ans)

        job = Job(session_id=sid, run=run, emit=emit, deadline=time.monotonic() + timeout,
                  request=make_request, to_final=to_final)
        with state.lock:
            current = state.active.get(sid)
            if current is not None and not current.done.is_set():
                raise SessionBusyError(f"session {sid[:8]} is already answering; wait or cancel it")
            state.queue.submit(job)
            state.active[sid] = job

        async def stream():
            try:
                yield format_sse("queued", {"waiting": state.queue.waiting})
                while True:
                    try:
                        event, data = await asyncio.wait_for(events.get(), timeout=15.0)
                    except asyncio.TimeoutError:
                        yield b": keep-alive\n\n"
                        continue
                    yield format_sse(event, data)
                    if event in ("final", "error"):
                        return
            finally:
                if not job.done.is_set():  # the client went away: free the GPU
                    job.cancel.set()
                with state.lock:
                    if state.active.get(sid) is job:
                        state.active.pop(sid, None)

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    return app

