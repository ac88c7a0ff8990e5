"""Request and response models of the worker's HTTP API; the constraints here are the contract
(the OpenAPI schema at ``/v1/openapi.json`` is generated from them). Limits that depend on the
worker's settings (question length, ``max_new_tokens``) and on the image (the box) are checked
by the routes, before anything is queued."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

Finite = Annotated[float, Field(allow_inf_nan=False)]
SEED_MAX = 2**64 - 1  # torch generators take 64-bit seeds


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not ignored


class SessionIn(_In):
    volume_id: str = Field(min_length=1, max_length=128, pattern=r"^[0-9A-Za-z_-]+$")


class MessageIn(_In):
    """One question. ``box``: voxel box (k1, j1, i1, k2, j2, i2), 2D (j1, i1, j2, i2), end
    exclusive, inside the image (checked against the session's volume)."""

    task: str = Field("ask", max_length=32)
    question: str | None = Field(None, max_length=100_000)  # pydantic refuses lone surrogates
    box: list[Finite] | None = Field(None, max_length=6)
    max_new_tokens: int = Field(256, ge=1, le=1 << 20)
    do_sample: bool = False
    temperature: Finite = Field(1.0, ge=0, le=1e4)
    top_p: Finite = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, le=1 << 24)
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    timeout_s: Finite | None = Field(None, gt=0, le=86400)


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorOut(BaseModel):
    error: ErrorBody


class HealthOut(BaseModel):
    status: str = Field(description="loading | ready | error | shutting_down")
    model: str
    model_info: dict[str, Any] = Field(
        default_factory=dict, description="the loaded model's identity and intended use (model card)")
    device: str
    memory: dict[str, Any]
    version: str
    api: int
    error: str | None = None
    queue_waiting: int
    busy: bool
    kinds: list[str]
    sessions: int
    max_sessions: int


class VolumeOut(BaseModel):
    volume_id: str
    created: bool


class SessionOut(BaseModel):
    session_id: str
    volume_id: str


class DeletedOut(BaseModel):
    deleted: bool


class CancelOut(BaseModel):
    cancelled: bool


class FinalEvent(BaseModel):
    """Data of the SSE ``final`` event that ends an answer."""

    text: str
    boxes: list[dict[str, list[float]]] = Field(
        description='[{"model": [...], "voxel": [...], "physical_lps": [x1, y1, z1, x2, y2, z2]}]')
    timings: dict[str, Any]
    num_tokens: int
    finish_reason: str
    task: str
    question: str = Field(description="the question as the model saw it (without the image)")


class ErrorEvent(BaseModel):
    """Data of the SSE ``error`` event that ends an answer."""

    code: str
    message: str
    status: int


MESSAGE_STREAM_DOC = {
    "description": "text/event-stream: `queued` {waiting}, `token` {text}*, then `final` "
                   "(FinalEvent) or `error` (ErrorEvent)",
    "content": {"text/event-stream": {"schema": {"oneOf": [
        {"$ref": "#/components/schemas/FinalEvent"},
        {"$ref": "#/components/schemas/ErrorEvent"}]}}},
}

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    "4XX": {"model": ErrorOut, "description": "bad request; the code says which"},
    "5XX": {"model": ErrorOut, "description": "loading, out of memory, shutting down, internal"},
}
