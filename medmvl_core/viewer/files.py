"""Writing a conversation from the viewer: JSON (reopens), Markdown, text, DICOM SR.

Every file is written to a temporary file beside the target and renamed, so a failure never
leaves half a file. The SR needs the DICOM series the image was read from (``source_path``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from medmvl_core.client.records import Conversation

KINDS = ("json", "md", "txt", "dcm")


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and a rename."""
    out = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".medmvl-", suffix=out.suffix, dir=str(out.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def export_conversation(conv: Conversation | None, path: str | os.PathLike, kind: str,
                        source_path: str | None = None) -> Path:
    """Write ``conv`` as ``kind`` ("json", "md", "txt" or "dcm") to ``path``."""
    if kind not in KINDS:
        raise ValueError(f"unknown export format {kind!r}; choose one of {', '.join(KINDS)}")
    if conv is None or not conv.turns:
        raise ValueError("there is no conversation to save yet: ask the model something first")
    if kind == "json":
        return write_text_atomic(path, conv.to_json() + "\n")
    if kind == "md":
        return write_text_atomic(path, conv.to_markdown())
    if kind == "txt":
        return write_text_atomic(path, conv.to_text())
    from medmvl_core.export import sr

    headers = sr.read_source_headers(source_path) if source_path else []
    return sr.write_sr(conv, headers, path)
