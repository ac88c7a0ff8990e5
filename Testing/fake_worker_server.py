"""A stand-in worker speaking the worker's HTTP API (health, volumes, sessions, messages as SSE,
cancel), in its own process: ``python fake_worker_server.py TOKEN [TOKENS DELAY_S]`` prints
``PORT`` and serves until killed. A test helper (standard library only): the transport tests
need a peer that keeps streaming while the test process's main thread holds the GIL.

Answers stream ``TOKENS`` pieces (``"w0 "``, ``"w1 "``, ...) ``DELAY_S`` apart, then a final
event; a cancel makes the running answer end with ``finish_reason: "cancelled"``. Session
``missing`` is unknown (404 ``unknown_session``). ``GET /v1/stats`` reports what was received.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOKEN = sys.argv[1] if len(sys.argv) > 1 else "tok"
N_TOKENS = int(sys.argv[2]) if len(sys.argv) > 2 else 20
DELAY = float(sys.argv[3]) if len(sys.argv) > 3 else 0.02
STATS = {"uploads": [], "asks": [], "cancels": 0, "deleted": []}
CANCEL = threading.Event()


def sse(event: str, data: object) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def _json(self, status: int, body: object) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _authorized(self) -> bool:
        if self.headers.get("Authorization") == f"Bearer {TOKEN}":
            return True
        self._body()
        self._json(401, {"error": {"code": "unauthorized", "message": "bad token"}})
        return False

    def do_GET(self):
        if not self._authorized():
            return
        if self.path == "/v1/health":
            self._json(200, {"status": "ready", "model": "fake-worker", "device": "cpu",
                             "memory": {}, "version": "0.1.0", "api": 1})
        elif self.path == "/v1/stats":
            self._json(200, STATS)
        else:
            self._json(404, {"error": {"code": "not_found", "message": self.path}})

    def do_DELETE(self):
        if not self._authorized():
            return
        STATS["deleted"].append(self.path)
        self._json(200, {})

    def do_POST(self):
        if not self._authorized():
            return
        body = self._body()
        if self.path == "/v1/volumes":
            meta = json.loads(self.headers.get("X-MedMVL-Meta", "{}"))
            STATS["uploads"].append({"bytes": len(body), "meta": meta})
            self._json(200, {"volume_id": f"v{len(STATS['uploads'])}"})
        elif self.path == "/v1/sessions":
            self._json(200, {"session_id": "s-" + json.loads(body)["volume_id"]})
        elif self.path.endswith("/cancel"):
            STATS["cancels"] += 1
            CANCEL.set()
            self._json(200, {"cancelled": True})
        elif self.path.endswith("/messages"):
            sid = self.path.split("/")[3]
            if sid == "missing":
                self._json(404, {"error": {"code": "unknown_session", "message": "unknown session"}})
                return
            req = json.loads(body)
            STATS["asks"].append(req)
            self._stream(req)
        else:
            self._json(404, {"error": {"code": "not_found", "message": self.path}})

    def _stream(self, req: dict) -> None:
        CANCEL.clear()
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        text, reason, t0 = "", "stop", time.monotonic()
        for i in range(min(N_TOKENS, int(req.get("max_new_tokens", N_TOKENS)))):
            if CANCEL.is_set():
                reason = "cancelled"
                break
            piece = f"w{i} "
            text += piece
            self.wfile.write(sse("token", {"text": piece}))
            self.wfile.flush()
            time.sleep(DELAY)
        boxes = [{"voxel": [0, 1, 2, 3, 4, 5]}] if req.get("task") == "find" else []
        self.wfile.write(sse("final", {"text": text, "boxes": boxes, "num_tokens": len(text.split()),
                                       "finish_reason": reason, "task": req.get("task", "ask"),
                                       "question": req.get("question") or "",
                                       "timings": {"total_s": round(time.monotonic() - t0, 3)}}))
        self.wfile.flush()
        self.close_connection = True


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
