"""Request and response models of the worker's HTTP API; the constraints here are the contract
(the OpenAPI schema at ``/v1/openapi.json`` is generated from them). The generation settings of
:class:`MessageIn` and the fields of :class:`FinalEvent` are generated from the protocol
(:class:`~medmvl_core.client.protocol.GenerationSettings`, :class:`~medmvl_core.client.protocol.
Answer`), so they cannot differ from what the client sends and reads. Limits that depend on the
worker's settings (question length, ``max_new_tokens``) and on the image (the box) are checked
by the routes, before anything is queued."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, create_model

from medmvl_core.client.protocol import TASKS, Answer, GenerationSettings

Finite = Annotated[float, Field(allow_inf_nan=False)]
#: protocol field type (as written in the dataclass) -> the pydantic type checked on the wire
_WIRE_TYPES: dict[str, Any] = {"int": int, "bool": bool, "float": Finite, "int | None": int | None,
                               "str": str, "list[dict]": list[dict[str, list[float]]],
                               "dict[str, float]": dict[str, Any]}


def _field_def(f: dataclasses.Field, required: bool = False) -> tuple[Any, Any]:
    """A protocol dataclass field as a ``(type, FieldInfo)`` pair for ``create_model``."""
    meta = dict(f.metadata)
    bounds = {k: meta[k] for k in ("ge", "gt", "le") if k in meta}
    if required:
        default: Any = ...
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        default = f.default_factory()  # type: ignore[misc]
    else:
        default = f.default
    wire_type = _WIRE_TYPES.get(str(f.type))
    if wire_type is None:  # a new protocol field of a type this table does not know yet
        raise TypeError(f"protocol field {f.name!r} has type {f.type!r}; add it to _WIRE_TYPES")
    return wire_type, Field(default, description=meta.get("description"), **bounds)


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not ignored


class SessionIn(_In):
    volume_id: str = Field(min_length=1, max_length=128, pattern=r"^[0-9A-Za-z_-]+$")


class _MessageBase(_In):
    task: str = Field("ask", max_length=32, description="one of " + ", ".join(TASKS))
    question: str | None = Field(None, max_length=100_000)  # pydantic refuses lone surrogates
    box: list[Finite] | None = Field(None, max_length=6)


MessageIn = create_model(
    "MessageIn", __base__=_MessageBase, __module__=__name__,
    **{f.name: _field_def(f) for f in dataclasses.fields(GenerationSettings)},
    timeout_s=(Finite | None, Field(None, gt=0, le=86400)))
MessageIn.__doc__ = """One question. ``box``: voxel box (k1, j1, i1, k2, j2, i2), 2D (j1, i1, j2, i2),
end exclusive, inside the image (checked against the session's volume). The generation settings
are :class:`~medmvl_core.client.protocol.GenerationSettings`' fields."""


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


FinalEvent = create_model(
    "FinalEvent", __module__=__name__,
    **{f.name: _field_def(f, required=True) for f in dataclasses.fields(Answer)})
FinalEvent.__doc__ = """Data of the SSE ``final`` event that ends an answer
(:class:`~medmvl_core.client.protocol.Answer`)."""


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
