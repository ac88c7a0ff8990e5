"""Limits and options of a worker process."""

from __future__ import annotations

import ipaddress
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from medmvl_core.errors import ConfigError


@dataclass
class WorkerSettings:
    """token: required on every request (``Authorization: Bearer``).

    max_queue: questions waiting for the GPU (beyond the one running); more get HTTP 429.
    max_upload_bytes: largest accepted array; max_question_chars: longest question;
    max_new_tokens: upper bound a request may ask for; request_timeout_s: default and maximum
    time one answer may take (queue wait included); volume_store_bytes: budget of uploaded
    arrays kept in memory (LRU); sessions on a volume the store lets go end with
    ``volume_evicted``); max_sessions: open conversations (past it the least recently used idle
    one is dropped and answers ``session_evicted``); max_batch: questions decoded together in one
    batch; max_json_bytes: largest JSON request body; body_timeout_s: longest wait for the next
    piece of a request body (a half-sent body is answered 408 and closed); upload_buffer_bytes:
    bytes of upload bodies received at the same time (one upload is always admitted; another
    that would pass it gets 429 ``uploads_busy``).
    """

    token: str
    max_queue: int = 8
    max_upload_bytes: int = 1 << 30
    max_question_chars: int = 4000
    max_new_tokens: int = 1024
    request_timeout_s: float = 300.0
    volume_store_bytes: int = 4 << 30
    max_sessions: int = 256
    max_batch: int = 4
    max_json_bytes: int = 64 * 1024
    body_timeout_s: float = 30.0
    upload_buffer_bytes: int = 2 << 30
    model_name: str = ""
    #: name, revision, content hash, intended use (``client.model_identity``), for health
    model_info: dict = field(default_factory=dict)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_or_create_token(token_file: Path) -> str:
    """The token in ``token_file`` or, if missing/empty, a new random one written there (0600)."""
    if token_file.exists():
        tok = token_file.read_text().strip()
        if tok:
            if len(tok) < 16:
                raise ConfigError(f"the token in {token_file} is shorter than 16 characters; "
                                  "use a long random token")
            return tok
    token_file.parent.mkdir(parents=True, exist_ok=True)
    tok = secrets.token_urlsafe(32)
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(tok)
    return tok
