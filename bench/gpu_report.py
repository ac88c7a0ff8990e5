"""The record of a ``bench/gpu.py`` run: rows printed as they are measured, each section's status
(ok / failed / skipped, with the reason and its seconds), the issue's targets checked, all in
one JSON file rewritten after every row (a run cut short keeps what it measured)."""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

import torch

logger = logging.getLogger("bench.gpu")

SECTIONS = ("ttft", "decode", "train", "memory", "profile")
#: (metric row, comparison, threshold or a function of the rows, unit, what the issue asks)
TARGETS: list[tuple[str, str, Any, str, str]] = [
    ("ours b1", ">=", lambda r: 0.7 * r.get("decode floor b1", math.nan), "tokens/s", "70% of the decode floor"),
    ("ours b8", ">=", 1500.0, "tokens/s", "batch-8 aggregate"),
    ("follow-up TTFT", "<=", 15.0, "ms", "session KV reused"),
    ("cold TTFT", "<=", 1200.0, "ms", "512x512x300 CT, reading and preprocessing included"),
    ("memory 4bit", "<=", 4000.0, "MB", "3B model in 4-bit"),
    ("memory 8bit", "<=", 5000.0, "MB", "3B model in 8-bit"),
    ("train LoRA MFU", ">=", 35.0, "%", "LoRA finetune of the CT-Chest architecture"),
]


def machine(device: torch.device) -> dict:
    """Versions and the device: the GPU's name, memory, CUDA and driver, or the CPU's name."""
    import transformers

    from bench.machine_info import cpu_name

    info = {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "device": device.type, "transformers": transformers.__version__}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 2 ** 30, 1), cuda=torch.version.cuda,
                    driver=_driver())
    else:
        info["cpu"] = cpu_name()
    return info


def _driver() -> str | None:
    try:
        import subprocess

        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


class Report(list):
    """The table's rows (name, value, unit, note) plus each section's status.

    time_limit_s: a section that would start after this many seconds of the run is skipped with
    a row that says so (the whole run fits a device lease); None: no limit.
    """

    def __init__(self, info: dict, json_path: Path | None = None, time_limit_s: float | None = None):
        super().__init__()
        self.info, self.json_path = info, json_path
        self.t0 = time.monotonic()
        self.time_limit_s = time_limit_s
        self.sections: dict[str, dict] = {}

    def append(self, row) -> None:
        super().append(row)
        name, value, unit, note = row
        print(f"row: {name} = {value:.4g} {unit} ({note})", flush=True)
        self.write()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def write(self, complete: bool = False) -> None:
        if self.json_path is None:
            return
        self.json_path.write_text(json.dumps({
            "machine": self.info, "complete": complete, "elapsed_s": round(self.elapsed(), 1),
            "sections": self.sections, "rows": [list(r) for r in self], "targets": check_targets(self),
        }, indent=1, default=str))

    def skip(self, name: str, why: str) -> None:
        self.sections[name] = {"status": "skipped", "seconds": 0.0, "error": why}
        self.append((name, math.nan, "", f"skipped: {why}"))

    def section(self, name: str, fn: Callable, *args: Any) -> Any:
        """Run one section; a failure (or the time limit) becomes a row and the run goes on."""
        if self.time_limit_s is not None and self.elapsed() > self.time_limit_s:
            sec = name.split()[0]
            hint = f"; run it alone with --sections {sec}" if sec in SECTIONS else ""
            self.skip(name, f"the run's time limit ({self.time_limit_s:.0f} s) was reached{hint}")
            return None
        t0 = time.monotonic()
        try:
            out = fn(*args)
        except Exception as exc:  # noqa: BLE001 - reported in the table
            dt = time.monotonic() - t0
            logger.exception("bench section %s failed", name)
            msg = f"{type(exc).__name__}: {str(exc)[:200]}"
            self.sections[name] = {"status": "failed", "seconds": round(dt, 1), "error": msg}
            self.append((name, math.nan, "", f"failed after {dt:.1f} s: {msg}; the other sections ran"))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return None
        self.sections[name] = {"status": "ok", "seconds": round(time.monotonic() - t0, 1), "error": None}
        self.write()
        return out


def guarded(rows: list, name: str, fn: Callable, *args: Any) -> Any:
    """Run one bench section; a failure becomes a table row instead of ending the run."""
    if isinstance(rows, Report):
        return rows.section(name, fn, *args)
    try:
        return fn(*args)
    except Exception as exc:  # noqa: BLE001 - reported in the table
        logger.exception("bench section %s failed", name)
        rows.append((name, math.nan, "", f"failed: {type(exc).__name__}: {str(exc)[:200]}"))
        return None


def check_targets(rows: list) -> list[dict]:
    """Each of the issue's targets with this run's value: met True / False, None when not measured."""
    values = {r[0]: r[1] for r in rows}
    out = []
    for metric, op, threshold, unit, what in TARGETS:
        limit = threshold(values) if callable(threshold) else threshold
        value = values.get(metric, math.nan)
        met = None
        if isinstance(value, float) and math.isfinite(value) and math.isfinite(limit):
            met = value >= limit if op == ">=" else value <= limit
        out.append({"metric": metric, "value": value, "target": f"{op} {limit:.4g} {unit}", "what": what,
                    "met": met})
    return out


def print_table(rows: list) -> None:
    print("| metric | value | unit | notes |")
    print("|---|---:|---|---|")
    for name, value, unit, note in rows:
        print(f"| {name} | {value:.4g} | {unit} | {note} |")


def print_targets(rows: list) -> None:
    print("\n| target | value | wanted | met |")
    print("|---|---:|---|---|")
    for t in check_targets(rows):
        met = {True: "yes", False: "NO", None: "not measured"}[t["met"]]
        print(f"| {t['metric']} ({t['what']}) | {t['value']:.4g} | {t['target']} | {met} |")
