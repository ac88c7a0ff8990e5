"""Helpers for tests against a real worker process: a toy checkpoint, the interpreter wrapper that
starts it, process memory readings and raw HTTP."""

from __future__ import annotations

import json
import os
import select
import socket
import stat
import sys
from pathlib import Path

TESTING_DIR = Path(__file__).resolve().parent


def toy_checkpoint(folder: Path, reference_dir: Path, step_delay_s: float = 0.0) -> Path:
    """A folder the toy worker (``toy_worker.py``) loads the tiny stand-in model from."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "toy_spec.json").write_text(json.dumps(
        {"tokenizer_dir": str(reference_dir / "base" / "llm"), "step_delay_s": step_delay_s}))
    return folder


def toy_python(folder: Path) -> str:
    """An executable that stands in for ``python`` in ``WorkerLauncher(python=...)``: it runs
    ``toy_worker.py`` with the launcher's arguments (``-m medmvl_core.cli serve ...``)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "toy-python"
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{TESTING_DIR / "toy_worker.py"}" "$@"\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def proc_status_kb(pid: int, field: str) -> int:
    """A ``/proc/PID/status`` memory field in KiB (VmRSS: now, VmHWM: the peak so far)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def rss_mb(pid: int) -> float:
    return proc_status_kb(pid, "VmRSS") / 1024


def peak_mb(pid: int) -> float:
    return proc_status_kb(pid, "VmHWM") / 1024


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs); False when not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie has exited already
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def send_raw(port: int, head: bytes, body_chunks=(), read_timeout: float = 30.0,
             pause_s: float = 0.0) -> tuple[int, dict, bytes]:
    """Send ``head`` (request line + headers + blank line) and then ``body_chunks`` on a raw
    socket, stopping when the server answers or closes. Returns (status, headers, body)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=read_timeout)
    try:
        sock.sendall(head)
        for chunk in body_chunks:
            # stop sending as soon as the server has answered (an early 413 / 408)
            if select.select([sock], [], [], pause_s)[0]:
                break
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
        data = b""
        sock.settimeout(read_timeout)
        while b"\r\n\r\n" not in data:
            try:
                part = sock.recv(65536)
            except ConnectionResetError:
                break
            if not part:
                break
            data += part
        head_raw, _, rest = data.partition(b"\r\n\r\n")
        lines = head_raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1]) if lines and lines[0] else 0
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        want = int(headers.get("content-length", "0") or 0)
        sock.settimeout(5)
        while len(rest) < want:
            try:
                part = sock.recv(65536)
            except OSError:
                break
            if not part:
                break
            rest += part
        return status, headers, rest
    finally:
        sock.close()
