"""Request bodies are bounded while they are read (ASGI middleware, before any route runs).

- A JSON route's body is read here, at most ``json_limit`` bytes: a larger ``Content-Length``
  is refused before a byte is read, and a chunked body is refused as soon as it passes the limit.
  The route then gets the body from memory.
- The upload route streams its body itself (into one buffer of the declared size, see
  :mod:`medmvl_core.worker.routers.volumes`); here it only gets the ``Content-Length`` check
  against ``upload_limit``.
- Every wait for the next piece of a body is bounded by ``timeout_s``: a client that stops
  half-way gets 408 ``body_timeout`` and the connection is closed.
- Lingering close: an answer that closes the connection (``Connection: close``) while the
  request body is still arriving is written whole, then the rest of the body is read and
  discarded for at most ``LINGER_S`` seconds and ``LINGER_BYTES`` bytes, and only then is the
  connection closed. Closing a socket with unread data makes the kernel send a TCP reset, and
  the reset can destroy the answer before the client has read it (a client that sends its
  whole body before reading, as ``http.client`` does, would see "connection reset" instead of
  413). uvicorn closes as soon as an answer is complete, so the answer's last (empty) piece is
  held back until the drain ends. A body that goes on past the bounds is cut off as before.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

from medmvl_core.errors import MedMVLError
from medmvl_core.worker.responses import error_response

logger = logging.getLogger(__name__)

UPLOAD_PATH = "/v1/volumes"
# lingering close: how long and how much of a refused body is read (and discarded) before closing
LINGER_S = 2.0
LINGER_BYTES = 8 << 20

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
        linger = _LingeringClose(receive, send)
        send = linger.send
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
        timed = linger.track(timed_receive(receive, timeout_s))
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


class _LingeringClose:
    """One request's lingering close (see the module docstring).

    ``track`` wraps the ``receive`` the body is read through, to learn whether the body was read
    to its end; ``send`` is the ``send`` the app answers through. The drain reads the server's
    own ``receive`` (not the timed one) and keeps no byte: memory stays at one piece (uvicorn
    pauses reading at 64 KiB).
    """

    def __init__(self, receive: Receive, send: Callable[[dict], Awaitable[None]]):
        self._receive = receive
        self._send = send
        self.body_done = False  # read to its end, or nothing more will come
        self._closing = False

    def track(self, receive: Receive) -> Receive:
        async def tracked() -> dict:
            try:
                message = await receive()
            except BodyTimeoutError:
                self.body_done = True  # the client stopped sending: nothing to wait for
                raise
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                self.body_done = True
            return message
        return tracked

    async def send(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self._closing = any(k.lower() == b"connection" and b"close" in v.lower()
                                for k, v in message.get("headers") or ())
        elif (message["type"] == "http.response.body" and not message.get("more_body", False)
              and self._closing and not self.body_done):
            # the whole answer goes out now (its Content-Length tells the client where it ends);
            # the empty last piece, on which uvicorn closes the connection, waits for the drain
            await self._send({**message, "more_body": True})
            await self._drain()
            await self._send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        await self._send(message)

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LINGER_S
        read = 0
        while read <= LINGER_BYTES:
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                message = await asyncio.wait_for(self._receive(), left)
            except asyncio.TimeoutError:
                break
            if message["type"] == "http.disconnect":
                self.body_done = True
                return
            read += len(message.get("body", b""))
            if not message.get("more_body", False):
                self.body_done = True
                return
        logger.debug("lingering close: stopped after %.1f s and %d bytes of an unread body; closing",
                     LINGER_S - max(0.0, deadline - loop.time()), read)
