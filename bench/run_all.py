"""Run every CPU benchmark under bench/ in turn (what `make bench` does).

Each benchmark prints its own table, the reference it is compared with (measured in the same
run) and the machine it ran on. On a machine with CUDA, bench/gpu.py runs the real-size model.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = [
    ["bench_preprocess.py"],
    ["bench_followup.py"],
    ["gpu.py"] if "--gpu" in sys.argv else ["gpu.py", "--device", "cpu", "--small"],
]


def main() -> int:
    failed = []
    for cmd in BENCHMARKS:
        print(f"\n=== {' '.join(cmd)} ===", flush=True)
        rc = subprocess.call([sys.executable, str(HERE / cmd[0]), *cmd[1:]])
        if rc != 0:
            failed.append(cmd[0])
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
