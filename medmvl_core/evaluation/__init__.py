"""Evaluation suite: the metrics of the MedM-VL paper tables, computed offline.

Exact definitions: the docstrings of the modules below; user guide: docs/evaluation.md.

```python
from medmvl_core.evaluation import evaluate, EvalOptions, benchmark_names
result = evaluate("out.json", "m3d-vqa-open", EvalOptions(bertscore_model="/models/roberta-large"))
result.metrics["bleu1"]["value"]          # x100; per_type / macro / micro alongside
result.skipped_metrics()                  # metrics whose data/model is missing
```

Modules: :mod:`.samples` (reading MedM-VL inference output and where the ground truth comes
from), :mod:`.text_metrics`, :mod:`.meteor`, :mod:`.bertscore`, :mod:`.coco`, :mod:`.box_metrics`
(metric primitives), :mod:`.m3d`, :mod:`.unimed` (benchmarks), :mod:`.registry` (the name ->
benchmark dict and the plug-in hook that picks up ``phantom_metrics``), :mod:`.report`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from medmvl_core.evaluation.options import EvalOptions
from medmvl_core.evaluation.registry import (REGISTRY, Benchmark, BenchmarkRegistry,
                                             benchmark_names, get_benchmark)
from medmvl_core.evaluation.results import EvalResult, Skip, ok, skipped
from medmvl_core.evaluation.samples import Sample, load_samples

__all__ = ["evaluate", "EvalOptions", "EvalResult", "Benchmark", "BenchmarkRegistry", "REGISTRY",
           "benchmark_names", "get_benchmark", "Sample", "load_samples", "Skip", "ok", "skipped"]


def evaluate(predictions: str | Path | Sequence[Sample], benchmark: str,
             options: EvalOptions | None = None, references: str | Path | None = None) -> EvalResult:
    """Score a predictions file (or already-loaded samples) on a registered benchmark.

    Never downloads: ``HF_HUB_OFFLINE=1`` is set for the process. Metrics whose data or model is
    missing come back as skipped (see :class:`EvalResult.skipped_metrics`)."""
    from medmvl_core.evaluation.provenance import base_provenance

    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    options = options or EvalOptions()
    bench = get_benchmark(benchmark)
    if isinstance(predictions, (str, Path)):
        samples = load_samples(predictions, references)
        source = str(predictions)
    else:
        samples, source = list(predictions), "<in memory>"
    result = bench.evaluate(samples, options)
    if isinstance(result, dict):  # a plug-in returning bare metric dicts
        result = EvalResult(benchmark=bench.name, metrics=result, headline=next(iter(result), ""))
    prov = base_provenance()
    from medmvl_core.evaluation.resources import METRIC_NEEDS

    prov.update({"benchmark": bench.name, "predictions": source, "paper": bench.paper,
                 "metric_needs": {k: v for k, v in METRIC_NEEDS.items()
                                  if any(m == k or (k.endswith("*") and m.startswith(k[:-1]))
                                         for m in result.metrics)}})
    prov.update(result.provenance)
    prov.setdefault("n", len(samples))
    prov.setdefault("empty_predictions", sum(1 for s in samples if not str(s.prediction or "").strip()))
    result.provenance = prov
    return result
