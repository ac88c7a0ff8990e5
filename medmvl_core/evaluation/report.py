"""``--report DIR``: metrics JSON, a Markdown table and PNG bar charts (matplotlib, Agg)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from medmvl_core.evaluation.results import EvalResult

logger = logging.getLogger(__name__)


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.2f}"


def markdown_table(result: EvalResult) -> str:
    """Headline metrics, then one row per question type where the benchmark has types."""
    lines = [f"# {result.benchmark}", "",
             f"N = {result.provenance.get('n')}, empty predictions = "
             f"{result.provenance.get('empty_predictions')}; "
             f"aggregation: {result.provenance.get('aggregation', '')}", "",
             "| metric | value | micro | status |", "|---|---:|---:|---|"]
    for key, m in result.metrics.items():
        status = m.get("status", "")
        if status == "skipped":
            status = f"skipped: {m.get('reason')} — fix: {m.get('fix')}"
        elif m.get("note"):
            status = f"ok ({m['note']})"
        lines.append(f"| {key}{' **(headline)**' if key == result.headline else ''} | "
                     f"{_fmt(m.get('value'))} | {_fmt(m.get('micro'))} | {status} |")
    typed = [k for k, m in result.metrics.items() if m.get("per_type")]
    if typed:
        types = list(result.metrics[typed[0]]["per_type"])
        lines += ["", "| question type | n | " + " | ".join(typed) + " |",
                  "|---|---:|" + "---:|" * len(typed)]
        for t in types:
            n = result.metrics[typed[0]].get("per_type_n", {}).get(t, "")
            lines.append(f"| {t} | {n} | " + " | ".join(
                _fmt(result.metrics[k]["per_type"].get(t)) for k in typed) + " |")
        if any("macro" in result.metrics[k] for k in typed):
            lines.append("| **macro** | | " + " | ".join(_fmt(result.metrics[k].get("macro")) for k in typed) + " |")
            lines.append("| **micro** | | " + " | ".join(_fmt(result.metrics[k].get("micro")) for k in typed) + " |")
    return "\n".join(lines) + "\n"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def write_report(result: EvalResult, out_dir: str | Path) -> list[Path]:
    """Write ``metrics.json``, ``samples.json``, ``metrics.md`` and PNG charts; return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    p = out / "metrics.json"
    p.write_text(json.dumps(result.to_json(include_samples=False), indent=2, ensure_ascii=False))
    written.append(p)
    p = out / "samples.json"
    p.write_text(json.dumps(result.samples, indent=1, ensure_ascii=False, default=str))
    written.append(p)
    p = out / "metrics.md"
    p.write_text(markdown_table(result), encoding="utf-8")
    written.append(p)
    written += _charts(result, out)
    return written


def _charts(result: EvalResult, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    ran = {k: m for k, m in result.metrics.items() if m.get("status") == "ok" and m.get("value") is not None}
    if ran:
        fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(ran)), 3.5))
        ax.bar(list(ran), [m["value"] for m in ran.values()], color="#4c72b0")
        ax.set_ylabel("score (x100)")
        ax.set_title(f"{result.benchmark} (N={result.provenance.get('n')})")
        ax.tick_params(axis="x", rotation=30)
        fig.tight_layout()
        p = out / "metrics.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)
    for key, m in ran.items():
        per_type = {t: v for t, v in (m.get("per_type") or {}).items()}
        if not per_type:
            continue
        fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(per_type)), 3.5))
        ax.bar(list(per_type), [0.0 if v is None else v for v in per_type.values()], color="#55a868")
        ax.set_ylabel(f"{key} (x100)")
        ax.set_title(f"{result.benchmark}: {key} per question type")
        ax.tick_params(axis="x", rotation=30)
        fig.tight_layout()
        p = out / f"per_type_{_safe(key)}.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        paths.append(p)
    return paths
