"""POST /v1/sessions, DELETE /v1/sessions/{id}, POST /v1/sessions/{id}/cancel."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends

from medmvl_core.worker.deps import get_engine, get_state, require_token
from medmvl_core.worker.models import ERROR_RESPONSES, CancelOut, DeletedOut, SessionIn, SessionOut
from medmvl_core.worker.state import WorkerState

router = APIRouter(tags=["sessions"], dependencies=[Depends(require_token)], responses=ERROR_RESPONSES)


@router.post("/sessions", response_model=SessionOut)
async def create_session(body: SessionIn, state: WorkerState = Depends(get_state),
                         _engine: Any = Depends(get_engine)) -> dict:
    """A conversation about an uploaded volume. Past the session cap the least recently used
    idle session is closed (it answers 410 ``session_evicted``)."""
    s = state.open_session(body.volume_id)
    return {"session_id": s.id, "volume_id": body.volume_id}


@router.delete("/sessions/{sid}", response_model=DeletedOut)
async def delete_session(sid: str, state: WorkerState = Depends(get_state),
                         _engine: Any = Depends(get_engine)) -> dict:
    state.delete_session(sid)
    return {"deleted": True}


@router.post("/sessions/{sid}/cancel", response_model=CancelOut)
async def cancel(sid: str, state: WorkerState = Depends(get_state),
                 _engine: Any = Depends(get_engine)) -> dict:
    state.session(sid)
    job = state.active.get(sid)
    if job is None or job.done.is_set():
        return {"cancelled": False}
    job.cancel.set()
    return {"cancelled": True}
