"""POST /v1/sessions/{id}/messages: one question, answered as a server-sent-event stream.

Every field is checked before the question is queued (the request model's constraints, then
the task's rules and the worker's limits, the generation settings and the box against the
session's image, all from :mod:`medmvl_core.client.protocol`), so a bad request is an HTTP 4xx,
never an ``error`` event after streaming started.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse

from medmvl_core.client.protocol import (Answer, GenerationSettings, format_sse, task_spec,
                                         validate_box)
from medmvl_core.engine.errors import RequestError, SessionBusyError
from medmvl_core.errors import MedMVLError
from medmvl_core.worker.deps import get_engine, get_state, require_token
from medmvl_core.worker.jobs import Job
from medmvl_core.worker.models import ERROR_RESPONSES, MESSAGE_STREAM_DOC, FinalEvent, MessageIn
from medmvl_core.worker.state import WorkerState

router = APIRouter(tags=["messages"], dependencies=[Depends(require_token)], responses=ERROR_RESPONSES)

KEEPALIVE_S = 15.0


def generation_of(body: MessageIn) -> GenerationSettings:
    """The request's generation settings (the fields of ``body`` that are settings)."""
    return GenerationSettings.from_dict(body.model_dump(include=set(GenerationSettings.names())))


def check_message(state: WorkerState, engine: Any, session: Any, body: MessageIn) -> float:
    """Raise the 4xx error for anything wrong with ``body``; return the time limit in seconds."""
    st = state.settings
    spec = task_spec(body.task)  # bad_task
    spec.check_question(body.question)  # empty_question
    q = body.question or ""
    if len(q) > st.max_question_chars:
        raise RequestError(f"the question has {len(q)} characters; the limit is "
                           f"{st.max_question_chars}", code="question_too_long")
    generation_of(body).validate(st.max_new_tokens)  # bad_max_new_tokens, bad_sampling
    engine.kind_for(session.volume)  # this model has a path for the image (2D / 3D)
    spec.check_box(body.box)  # bad_box
    if body.box is not None:
        validate_box(body.box, session.volume.array.shape)
    return st.request_timeout_s if body.timeout_s is None else min(body.timeout_s,
                                                                    st.request_timeout_s)


def final_event(job: Job, ans: Any) -> dict:
    """An engine Answer as the ``final`` event's data (:class:`FinalEvent`)."""
    timings = dict(ans.timings)
    timings["queue_s"] = (job.started or job.enqueued) - job.enqueued
    data = Answer(text=ans.text, boxes=ans.boxes, timings=timings, num_tokens=len(ans.token_ids),
                  finish_reason=ans.finish_reason, task=ans.task, question=ans.question).to_event()
    return FinalEvent(**data).model_dump()  # checked against the documented schema


@router.post("/sessions/{sid}/messages", responses={200: MESSAGE_STREAM_DOC},
             response_class=StreamingResponse)
async def message(sid: str, body: MessageIn, state: WorkerState = Depends(get_state),
                  engine: Any = Depends(get_engine)) -> StreamingResponse:
    if state.shutting_down:
        raise MedMVLError("the worker is shutting down; ask again once it is back",
                          code="shutting_down")
    session = state.session(sid)
    timeout = check_message(state, engine, session, body)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()

    def emit(event: str, data: dict) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, (event, data))
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            job.cancel.set()

    def make_request(job: Job):
        from medmvl_core.engine import Request
        if session.id not in engine.sessions:  # closed while it waited (its volume left)
            err = state.evicted_error(session.id)
            if err is not None:
                raise err
        return Request(session=session, question=body.question, task=body.task, box=body.box,
                       generation=generation_of(body),
                       on_token=lambda piece: emit("token", {"text": piece}),
                       cancel=job.cancel, deadline=job.deadline)

    def run(job: Job) -> dict:
        return final_event(job, engine.answer(**_answer_kwargs(make_request(job))))

    job = Job(session_id=sid, run=run, emit=emit, deadline=time.monotonic() + timeout,
              request=make_request, to_final=final_event)
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
                    event, data = await asyncio.wait_for(events.get(), timeout=KEEPALIVE_S)
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


def _answer_kwargs(r: Any) -> dict:
    """An engine Request as :meth:`Engine.answer` keyword arguments."""
    return dict(session=r.session, question=r.question, task=r.task, box=r.box,
                generation=r.generation, on_token=r.on_token, cancel=r.cancel, deadline=r.deadline)
