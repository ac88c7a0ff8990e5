"""The worker's one error shape, ``{"error": {"code", "message"}}``, for every error it sends —
its own, FastAPI's validation errors and Starlette's routing errors alike."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from medmvl_core.client.protocol import RETRY_AFTER_S, status_for
from medmvl_core.engine.errors import NotFoundError
from medmvl_core.errors import MedMVLError

logger = logging.getLogger(__name__)

# Starlette / FastAPI HTTP statuses -> our codes (unknown route, wrong method, unreadable body)
_HTTP_CODES = {400: "malformed_json", 401: "unauthorized", 403: "unauthorized",
               404: "unknown_route", 405: "method_not_allowed", 413: "too_large",
               415: "unsupported_media_type"}


def error_response(code: str, message: str, status: int | None = None,
                   close: bool = False) -> JSONResponse:
    """The JSON error answer; ``Retry-After`` where the code asks the client to come back."""
    headers = {}
    if code in RETRY_AFTER_S:
        headers["Retry-After"] = str(RETRY_AFTER_S[code])
    if close:  # the request body was not read to its end: this connection cannot be reused
        headers["Connection"] = "close"
    return JSONResponse({"error": {"code": code, "message": message}},
                        status_code=status or status_for(code), headers=headers)


def status_of(exc: MedMVLError) -> int:
    """HTTP status of an error: by its code, 404 for a not-found error with an unlisted code."""
    status = status_for(exc.code)
    return 404 if status == 400 and isinstance(exc, NotFoundError) else status


def _validation_message(exc: RequestValidationError) -> tuple[str, str]:
    errs = exc.errors()
    if any(e.get("type") in ("json_invalid", "json_type") for e in errs):
        return "malformed_json", "the request body is not valid JSON (UTF-8)"
    parts = []
    for e in errs[:5]:
        loc = ".".join(str(p) for p in e.get("loc", ())[1:]) or "body"
        parts.append(f"{loc}: {e.get('msg')}")
    return "invalid_request", "; ".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    """Map every exception a request can raise to :func:`error_response`."""

    @app.exception_handler(MedMVLError)
    async def medmvl_error(_request: Request, exc: MedMVLError):
        return error_response(exc.code, str(exc), status_of(exc),
                              close=exc.code in ("too_large", "body_timeout", "shape_mismatch"))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError):
        code, message = _validation_message(exc)
        return error_response(code, message, 400 if code == "malformed_json" else 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = _HTTP_CODES.get(exc.status_code, "bad_request" if exc.status_code < 500 else "internal")
        if code == "unknown_route":
            message = f"no such endpoint {request.method} {request.url.path}; see /v1/openapi.json"
        elif code == "method_not_allowed":
            message = f"{request.method} is not allowed on {request.url.path}"
        elif code == "malformed_json":
            message = "the request body could not be read as JSON (invalid UTF-8?)"
        else:
            message = str(exc.detail)
        return error_response(code, message, exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception):
        logger.error("unexpected error: %s", exc.__class__.__name__,
                     exc_info=(type(exc), exc, exc.__traceback__))
        return error_response("internal", "internal error; see the worker log", 500)
