"""The worker's HTTP API (FastAPI), versioned under ``/v1``; the schema is served at
``/v1/openapi.json`` (with the token).

GET  /v1/health                      status, model, device, memory by owner, queue, sessions
POST /v1/volumes                     body: raw little-endian array bytes; header X-MedMVL-Meta:
                                     {"dtype", "shape", "spacing", "origin", "direction", "modality"}
                                     -> {"volume_id", "created"} (id = content hash; idempotent)
DELETE /v1/volumes/{id}              closes the sessions on it (they answer 410 volume_evicted)
POST /v1/sessions                    {"volume_id"} -> {"session_id", "volume_id"}
DELETE /v1/sessions/{id}
POST /v1/sessions/{id}/messages      :class:`~medmvl_core.worker.models.MessageIn`
                                     -> text/event-stream: "queued", "token" {"text"}*, then
                                     "final" (FinalEvent) or "error" (ErrorEvent)
POST /v1/sessions/{id}/cancel        -> {"cancelled": bool}

Errors are ``{"error": {"code", "message"}}``; the codes and their statuses are
:data:`medmvl_core.client.protocol.ERROR_STATUS`. Every route needs
``Authorization: Bearer <token>`` (the ``require_token`` dependency, constant-time compare).
Request bodies are bounded while read (:mod:`medmvl_core.worker.guard`).
"""

from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI
from fastapi.openapi.utils import get_openapi

from medmvl_core import __version__
from medmvl_core.client.protocol import API_PREFIX
from medmvl_core.worker.deps import require_token
from medmvl_core.worker.guard import BodyGuard
from medmvl_core.worker.models import ErrorEvent, FinalEvent
from medmvl_core.worker.responses import install_error_handlers
from medmvl_core.worker.routers import health, messages, sessions, volumes
from medmvl_core.worker.state import WorkerState

OPENAPI_PATH = f"{API_PREFIX}/openapi.json"


def create_app(state: WorkerState) -> FastAPI:
    """Build the FastAPI app around a :class:`WorkerState`."""
    app = FastAPI(title="MedM-VL worker", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.worker = state
    for module in (health, volumes, sessions, messages):
        app.include_router(module.router, prefix=API_PREFIX)
    install_error_handlers(app)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            comps = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (FinalEvent, ErrorEvent):  # the stream's events are part of the contract
                comps[model.__name__] = model.model_json_schema(ref_template="#/components/schemas/{model}")
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get(OPENAPI_PATH, include_in_schema=False, dependencies=[Depends(require_token)])
    async def openapi_json() -> dict[str, Any]:
        return app.openapi()

    st = state.settings
    app.add_middleware(BodyGuard, limits=lambda: (st.max_json_bytes, st.max_upload_bytes,
                                                   st.body_timeout_s))
    return app
