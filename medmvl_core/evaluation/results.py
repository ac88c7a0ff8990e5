"""Metric values, skips and aggregation shared by every benchmark.

A metric is reported as a plain dict so it serialises to JSON unchanged:

- ran: ``{"value": float, "status": "ok", ...}`` (values are x100, as the papers print them);
- could not run: ``{"value": None, "status": "skipped", "reason": str, "fix": str}`` — never 0.0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence


@dataclass(frozen=True)
class Skip:
    """Why a metric could not run and what the user can do about it."""

    reason: str
    fix: str


def ok(value: float | None, **extra: Any) -> dict:
    """A metric that ran. ``value`` is already scaled (x100 for scores)."""
    return {"value": value, "status": "ok", **extra}


def skipped(skip: Skip, **extra: Any) -> dict:
    """A metric that could not run (missing data/model/library)."""
    return {"value": None, "status": "skipped", "reason": skip.reason, "fix": skip.fix, **extra}


def mean(values: Iterable[float]) -> float | None:
    """Arithmetic mean, ``None`` for no values (never 0 for 'nothing to average')."""
    vals = list(values)
    if not vals:
        return None
    return math.fsum(vals) / len(vals)


def scaled(v: float | None, scale: float = 100.0) -> float | None:
    return None if v is None else v * scale


def aggregate(scores: Sequence[float], types: Sequence[Any] | None, scale: float = 100.0,
              type_names: dict | None = None) -> dict:
    """Per-type means, their macro average and the micro (all-sample) mean, all scaled.

    ``value`` is the macro average when there are question types (the M3D-VQA tables appear to
    use it; see METRICS.md §1), else the micro average.
    """
    micro = scaled(mean(scores), scale)
    if not types or all(t is None for t in types):
        return ok(micro, micro=micro, n=len(scores), aggregation="micro")
    groups: dict[Any, list[float]] = {}
    for s, t in zip(scores, types):
        groups.setdefault(t, []).append(s)
    keys = sorted(groups, key=lambda k: (str(type(k)), k if k is not None else ""))
    per_type = {}
    for k in keys:
        label = _type_label(k, type_names)
        per_type[label] = scaled(mean(groups[k]), scale)
    macro = mean(v for v in per_type.values() if v is not None)
    return ok(macro, macro=macro, micro=micro, per_type=per_type,
              per_type_n={_type_label(k, type_names): len(groups[k]) for k in keys},
              n=len(scores), aggregation="macro over question types")


def _type_label(t: Any, names: dict | None) -> str:
    if names and t in names:
        return f"{t} {names[t]}"
    return "unknown" if t is None else str(t)


@dataclass
class EvalResult:
    """What a benchmark returns: metrics, the headline key, per-sample scores and provenance."""

    benchmark: str
    metrics: dict[str, dict]
    headline: str
    samples: list[dict] = field(default_factory=list)
    provenance: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def skipped_metrics(self) -> list[str]:
        return [k for k, m in self.metrics.items() if m.get("status") == "skipped"]

    def to_json(self, include_samples: bool = True) -> dict:
        out = {"benchmark": self.benchmark, "headline": self.headline, "metrics": self.metrics,
               "provenance": self.provenance, "notes": self.notes}
        if include_samples:
            out["samples"] = self.samples
        return out
