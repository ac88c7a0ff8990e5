"""Worker memory per request: a JSON body over the limit, an upload's peak, a deleted volume.

Starts ``medmvl serve`` on a checkpoint (default: the tiny fixture checkpoint, CPU) and reads the
worker process's RSS from ``/proc`` (Linux): the peak (VmHWM, reset before each step) and the
current value. The client side sends raw HTTP from a view of the array, so the figures are the
worker's alone.

    PYTHONPATH=$PWD .venv/bin/python bench/bench_worker_memory.py --upload-mb 1024
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MB = 1 << 20


def _status(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _measure(pid: int, fn):
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # peak := current
    base = _status(pid, "VmRSS")
    out = fn()
    time.sleep(0.2)
    return out, round(_status(pid, "VmHWM") - base, 1), _status(pid, "VmRSS")


def _request(port: int, token: str, method: str, path: str, body=None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    hdrs = {"Authorization": f"Bearer {token}"}
    hdrs.update(headers or {})
    try:
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, resp.read()
    except (BrokenPipeError, ConnectionResetError) as exc:
        return 0, str(exc).encode()
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=str(REPO / "Testing/data/medmvl_reference/ct_chest_tiny"))
    ap.add_argument("--upload-mb", type=int, default=256)
    ap.add_argument("--json-mb", type=int, default=48)
    args = ap.parse_args(argv)
    if not sys.platform.startswith("linux"):
        print("needs Linux (/proc)", file=sys.stderr)
        return 2
    from medmvl_core.client import WorkerLauncher  # run with PYTHONPATH=<the tree to measure>
    launcher = WorkerLauncher(checkpoint=args.checkpoint, device="cpu", start_timeout=300,
                              extra_args=["--max-upload-mb", str(args.upload_mb + 16)])
    client = launcher.start()
    pid, port, token = launcher.process.pid, client._port, client.token
    rows = {}
    try:
        body = b'{"volume_id": "' + b"a" * (args.json_mb * MB) + b'"}'
        (status, _), peak, _ = _measure(pid, lambda: _request(
            port, token, "POST", "/v1/sessions", body, {"Content-Type": "application/json"}))
        # status 0: the worker refused (413) and closed before http.client finished sending
        rows[f"json_body_{args.json_mb}mb"] = {"status": status, "peak_rss_growth_mb": peak}
        del body
        n = args.upload_mb * MB // 2
        arr = np.arange(n, dtype=np.int16).reshape(-1, 512, 1024)
        meta = {"dtype": "int16", "shape": list(arr.shape), "spacing": [1, 1, 1],
                "origin": [0, 0, 0], "direction": [1, 0, 0, 0, 1, 0, 0, 0, 1], "modality": "CT"}
        view = memoryview(arr.reshape(-1)).cast("B")
        (status, raw), peak, after = _measure(pid, lambda: _request(
            port, token, "POST", "/v1/volumes", view,
            {"Content-Type": "application/octet-stream", "X-MedMVL-Meta": json.dumps(meta),
             "Content-Length": str(view.nbytes)}))
        rows[f"upload_{args.upload_mb}mb"] = {"status": status, "peak_rss_growth_mb": peak}
        vid = json.loads(raw)["volume_id"]
        sid = client.create_session(vid)
        client.delete_volume(vid)
        time.sleep(0.5)
        rows["delete_volume_with_session"] = {"rss_freed_mb": round(after - _status(pid, "VmRSS"), 1)}
        status, raw = _request(port, token, "POST", f"/v1/sessions/{sid}/messages",
                               json.dumps({"question": "Is there a nodule?", "max_new_tokens": 2}),
                               {"Content-Type": "application/json"})
        last = raw.decode("utf-8", "replace").strip().split("\n\n")[-1].replace("\n", " ")[:80]
        rows["ask_after_delete"] = {"status": status, "answer": last}
    finally:
        launcher.close()
    machine = f"{platform.machine()} {os.cpu_count()} CPUs, {platform.system()}, CPU only"
    print(json.dumps({"machine": machine, "upload_mb": args.upload_mb, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
