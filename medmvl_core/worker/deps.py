"""FastAPI dependencies: the worker state, the bearer token, the loaded engine, a session."""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from medmvl_core.errors import MedMVLError
from medmvl_core.worker.state import WorkerState

_bearer = HTTPBearer(auto_error=False, description="the token in the worker's token file")


def get_state(request: Request) -> WorkerState:
    return request.app.state.worker


def require_token(state: WorkerState = Depends(get_state),
                  creds: HTTPAuthorizationCredentials | None = Depends(_bearer)) -> None:
    """Every route needs ``Authorization: Bearer <token>`` (compared in constant time)."""
    token = state.settings.token.encode()
    given = creds.credentials.encode() if creds is not None else b""
    if not token or not hmac.compare_digest(given, token):
        raise MedMVLError("missing or wrong token: send 'Authorization: Bearer <token>' (see the "
                          "worker's token file)", code="unauthorized")


def get_engine(state: WorkerState = Depends(get_state)) -> Any:
    """The loaded engine; 503 ``loading`` while the model loads (or failed to)."""
    if state.engine is None:
        msg = ("the model is still loading; retry in a moment" if state.status == "loading"
               else f"the model failed to load: {state.error}")
        raise MedMVLError(msg, code="loading")
    return state.engine
