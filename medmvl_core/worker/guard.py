"""Request bodies are bounded while they are read (ASGI middleware, before any route runs).

- A JSON route's body is read here, at most ``json_limit`` bytes: a larger ``Content-Length``
  is refused before a byte is read, and a chunked body is refused as soon as it passes the limit.
  The route then gets the body from memory.
- The upload route streams its body itself (into one buffer of the declared size, see
  :mod:`medmvl_core.worker.routers.volumes`); here it only gets the ``Content-Length`` check
  against ``upload_limit``.
- Every wait for the next piece of a body is bounded by ``timeout_s``: a client that stops
  half-way gets 408 ``body_timeout`` and the connection is closed.
"""

from __future__ import annotations

import asyncio
from typing import Any, Awaitable, Callable

from medmvl_core.errors import MedMVLError
from medmvl_core.worker.responses import error_response

UPLOAD_PATH = "/v1/volumes"

Receive = Callable[[], Awaitable[dict]]


class BodyTimeoutError(MedMVLError):
    code = "body_timeout"


def timed_receive(receive: Receive, timeout_s: float) -> Receive:
    """``receive`` that raises :class:`BodyTimeoutError` when the client sends nothing for
    ``timeout_s`` seconds."""

    async def wrapped() -> dict:
        try:
            return await asyncio.wait_for(receive(), timeout_s)
        except asyncio.TimeoutError:
            raise BodyTimeoutError(f"the request body stalled for {timeout_s:g} s; send the whole "
                                   "body without pauses") from None
    return wrapped


class BodyGuard:
    """ASGI middleware; ``limits()`` returns (json_limit, upload_limit, timeout_s) at call time
    (the settings may change in tests)."""

    def __init__(self, app: Any, limits: Callable[[], tuple[int, int, float]]):
        self.app = app
        self.limits = limits

    async def __call__(self, scope: dict, receive: Receive, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        json_limit, upload_limit, timeout_s = self.limits()
        upload = scope["method"] == "POST" and scope["path"] == UPLOAD_PATH
        limit = upload_limit if upload else json_limit
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await error_response("bad_request", "Content-Length must be a number of bytes",
                                     close=True)(scope, receive, send)
                return
            if int(declared) > limit:
                await self._too_large(scope, receive, send, int(declared), limit, upload)
                return
        timed = timed_receive(receive, timeout_s)
        if upload:
            await self.app(scope, timed, send)
            return
        body = bytearray()
        try:
            while True:
                message = await timed()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                if len(body) > limit:
                    await self._too_large(scope, receive, send, None, limit, upload)
                    return
                if not message.get("more_body", False):
                    break
        except BodyTimeoutError as exc:
            await error_response(exc.code, str(exc), close=True)(scope, receive, send)
            return
        await self.app(scope, _replay(bytes(body), receive), send)

    @staticmethod
    async def _too_large(scope, receive, send, size: int | None, limit: int, upload: bool) -> None:
        what = "upload" if upload else "JSON body"
        got = f"of {size} bytes " if size is not None else ""
        hint = ("downsample or crop the volume, or start the worker with a larger --max-upload-mb"
                if upload else "send a shorter request")
        await error_response("too_large", f"{what} {got}exceeds the limit of {limit} bytes; {hint}",
                             close=True)(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    """Hand the buffered body to the app once, then pass on (disconnect notices, untimed: an
    answer may stream for minutes)."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replay
