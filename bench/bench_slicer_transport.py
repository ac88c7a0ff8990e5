"""Benchmark: the Slicer panel's two transports when the GUI's main thread holds the GIL between
events (as an embedding application may) and when it releases it (plain PySide).

Connect + one answer through the panel controller, the GUI woken only by the panel's 100 ms poll
timer, against a worker stand-in that streams ``--tokens`` pieces ``--delay`` s apart (so the
worker itself needs tokens x delay). ``threads``: WorkerClient on Python threads (the viewer's
path); ``qt``: QtRunner + QtWorkerClient (the Slicer module's default). Each run is a fresh
process (Testing/qt_gil_harness.py); the table gives the median of ``--repeats``.

    python bench/bench_slicer_transport.py [--tokens 100] [--delay 0.02] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTING = REPO / "Testing"
sys.path.insert(0, str(REPO))

from bench.machine_info import cpu_name  # noqa: E402 - needs the repository on sys.path


def run(scenario: str, url: str, release: bool) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(TESTING)]),
               QT_QPA_PLATFORM="offscreen", HARNESS_RELEASE_GIL="1" if release else "0")
    out = subprocess.run([sys.executable, str(TESTING / "qt_gil_harness.py"), scenario, url, "tok"],
                         capture_output=True, text=True, timeout=300, env=env)
    if out.returncode != 0:
        raise SystemExit(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--delay", type=float, default=0.02)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    server = subprocess.Popen([sys.executable, str(TESTING / "fake_worker_server.py"), "tok",
                               str(args.tokens), str(args.delay)], stdout=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{int(server.stdout.readline())}"
        print(f"machine: {cpu_name()}, {os.cpu_count()} cores, {platform.python_version()}; "
              f"worker stand-in: {args.tokens} tokens x {args.delay} s = "
              f"{args.tokens * args.delay:.2f} s")
        print("| GIL between events | transport | connect s | connect+answer s |")
        print("|---|---|---|---|")
        c0 = time.process_time()
        for release in (False, True):
            for scenario, name in (("threads", "threads"), ("qt_panel", "qt")):
                runs = [run(scenario, url, release) for _ in range(args.repeats)]
                ok = all(r["answered_s"] > 0 for r in runs)
                con = statistics.median(r["connected_s"] for r in runs)
                ans = statistics.median(r["answered_s"] for r in runs) if ok else float("nan")
                print(f"| {'released' if release else 'held'} | {name} | {con:.2f} | {ans:.2f} |")
        print(f"(bench process CPU {time.process_time() - c0:.1f} s; each run is a subprocess)")
    finally:
        server.kill()
        server.wait(10)


if __name__ == "__main__":
    main()
