"""The benchmark registry: an explicit name -> :class:`Benchmark` dict with exact lookup.

Plug-in hook (used by the phantom benchmark): on first lookup the registry imports each module
of :data:`PLUGIN_MODULES` that exists (``medmvl_core.evaluation.phantom_metrics`` -> benchmark
``phantoms``). A plug-in module registers its benchmarks in one of three ways, tried in order:

- a function ``register(registry: BenchmarkRegistry) -> None`` that calls
  ``registry.register(Benchmark(name="phantoms", description=..., evaluate=fn))``;
- a module-level dict ``BENCHMARKS = {"phantoms": fn_or_Benchmark}``;
- a plain ``evaluate(items: list[dict]) -> dict[str, float]`` (what ``phantom_metrics`` has):
  it is registered under the name in :data:`PLUGIN_MODULES` and called with the raw items of
  the predictions file, each given a ``prediction`` key (the generated gpt turn) when it has
  none. Values in [0, 1] are reported x100; ``n_*`` keys go to the provenance.

An evaluate function has the signature ``fn(samples: list[Sample], options: EvalOptions) ->
EvalResult | dict``. A plain dict is wrapped: it must map metric names to metric dicts
(``{"value": float | None, "status": "ok" | "skipped", ...}``, see
:mod:`medmvl_core.evaluation.results`); the first key is the headline. More plug-in modules can
be added to :data:`PLUGIN_MODULES`. A plug-in that fails to import is logged and left out; its
names are then unknown (the error says so).
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from typing import Callable

from medmvl_core.errors import RegistryError
from medmvl_core.evaluation import m3d, unimed

logger = logging.getLogger(__name__)

PLUGIN_MODULES = {"medmvl_core.evaluation.phantom_metrics": "phantoms"}


@dataclass(frozen=True)
class Benchmark:
    """``evaluate(samples, options) -> EvalResult``; ``task`` names the scoring family."""

    name: str
    description: str
    evaluate: Callable
    task: str = ""
    paper: str = ""


@dataclass
class BenchmarkRegistry:
    _items: dict[str, Benchmark] = field(default_factory=dict)
    _plugins_loaded: bool = False
    _plugin_errors: dict[str, str] = field(default_factory=dict)

    def register(self, bench: Benchmark) -> None:
        if bench.name in self._items:
            raise RegistryError(f"benchmark {bench.name!r} is already registered; pick another name")
        self._items[bench.name] = bench

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for modname in PLUGIN_MODULES:
            try:
                mod = importlib.import_module(modname)
            except ModuleNotFoundError as exc:
                if exc.name != modname:
                    self._plugin_errors[modname] = f"{type(exc).__name__}: {exc}"
                    logger.warning("benchmark plug-in %s failed to import: %s", modname, exc)
                continue
            except Exception as exc:  # a broken plug-in must not break the other benchmarks
                self._plugin_errors[modname] = f"{type(exc).__name__}: {exc}"
                logger.warning("benchmark plug-in %s failed to import: %s", modname, exc)
                continue
            try:
                if hasattr(mod, "register"):
                    mod.register(self)
                if not hasattr(mod, "register") and not hasattr(mod, "BENCHMARKS") and callable(
                        getattr(mod, "evaluate", None)):
                    name = PLUGIN_MODULES[modname]
                    if name not in self._items:
                        self.register(Benchmark(name=name, evaluate=_item_plugin(mod.evaluate, name),
                                                description=(mod.__doc__ or name).strip().split("\n")[0],
                                                task="plugin"))
                for name, obj in getattr(mod, "BENCHMARKS", {}).items():
                    if name in self._items:
                        continue
                    if not isinstance(obj, Benchmark):
                        obj = Benchmark(name=name, description=(obj.__doc__ or "").strip().split("\n")[0],
                                        evaluate=obj, task="plugin")
                    self.register(obj)
            except Exception as exc:
                self._plugin_errors[modname] = f"{type(exc).__name__}: {exc}"
                logger.warning("benchmark plug-in %s failed to register: %s", modname, exc)

    def names(self) -> list[str]:
        self._load_plugins()
        return sorted(self._items)

    def get(self, name: str) -> Benchmark:
        """Exact lookup (``_`` is accepted for ``-``); unknown names list the valid ones."""
        self._load_plugins()
        key = name.strip().lower().replace("_", "-")
        if key not in self._items:
            extra = ""
            if self._plugin_errors:
                extra = " (plug-ins that failed to load: " + "; ".join(
                    f"{m}: {e}" for m, e in self._plugin_errors.items()) + ")"
            raise RegistryError(f"unknown benchmark {name!r}; valid names: "
                                f"{', '.join(self.names())}{extra}")
        return self._items[key]

    def __contains__(self, name: str) -> bool:
        self._load_plugins()
        return name.strip().lower().replace("_", "-") in self._items


def _item_plugin(fn: Callable, name: str) -> Callable:
    """Adapt ``evaluate(items) -> {metric: fraction, "n_<task>": count}`` to a Benchmark."""

    def run(samples, options):
        from medmvl_core.evaluation.results import EvalResult, ok

        items = []
        for s in samples:
            item = dict(s.raw)
            item.setdefault("prediction", s.prediction)
            items.append(item)
        flat = fn(items)
        metrics, prov = {}, {"aggregation": "as defined by the plug-in", "n": len(samples)}
        for key, value in flat.items():
            if key.startswith("n_"):
                prov[key] = value
            else:
                metrics[key] = ok(None if value is None else float(value) * 100.0)
        headline = "closed_accuracy" if "closed_accuracy" in metrics else next(iter(metrics), "")
        return EvalResult(benchmark=name, metrics=metrics, headline=headline, provenance=prov)

    run.__doc__ = fn.__doc__
    return run


def _named(fn: Callable, name: str) -> Callable:
    def run(samples, options):
        return fn(samples, options, name=name)

    run.__doc__ = fn.__doc__
    return run


def _builtin() -> BenchmarkRegistry:
    reg = BenchmarkRegistry()
    table = [
        ("m3d-cap", m3d.evaluate_cap, "caption", "M3D-Cap report generation: BLEU-1, ROUGE-1, METEOR, BERTScore"),
        ("m3d-vqa-open", m3d.evaluate_vqa_open, "vqa-open", "M3D-VQA open: BLEU-1, ROUGE-1, METEOR, BERTScore per type"),
        ("m3d-vqa-closed", m3d.evaluate_vqa_closed, "vqa-closed", "M3D-VQA closed: choice accuracy per type"),
        ("m3d-rec", m3d.evaluate_rec, "rec-3d", "M3D referring expression: 3D box IoU, Acc@0.5"),
        ("unimed-cls", unimed.evaluate_cls, "cls", "Uni-Med classification: normalised exact match"),
        ("unimed-medmnist-derma", unimed.evaluate_cls, "cls", "MedMNIST DermaMNIST (Uni-Med)"),
        ("unimed-medmnist-organs", unimed.evaluate_cls, "cls", "MedMNIST OrganSMNIST (Uni-Med)"),
        ("unimed-report", unimed.evaluate_report, "report", "Uni-Med report generation: coco BLEU-1"),
        ("unimed-mimic", unimed.evaluate_report, "report", "MIMIC-CXR report generation (Uni-Med)"),
        ("unimed-medpix", unimed.evaluate_report, "report", "MedPix captioning (Uni-Med)"),
        ("unimed-vqa", unimed.evaluate_vqa, "vqa", "Uni-Med VQA: normalised BLEU-1"),
        ("unimed-slakevqa", unimed.evaluate_vqa, "vqa", "SLAKE VQA (Uni-Med)"),
        ("unimed-pathvqa", unimed.evaluate_vqa, "vqa", "PathVQA (Uni-Med)"),
        ("unimed-identify", unimed.evaluate_identify, "identify", "Uni-Med region identification: BLEU-1"),
        ("unimed-slake-identify", unimed.evaluate_identify, "identify", "SLAKE identify (Uni-Med)"),
        ("unimed-samed-identify", unimed.evaluate_identify, "identify", "SA-Med2D identify (Uni-Med)"),
        ("unimed-refer", unimed.evaluate_refer, "refer", "Uni-Med referring boxes: mIoU, Acc@0.5"),
        ("unimed-slake-refer", unimed.evaluate_refer, "refer", "SLAKE refer (Uni-Med)"),
        ("unimed-samed-refer", unimed.evaluate_refer, "refer", "SA-Med2D refer (Uni-Med)"),
    ]
    for name, fn, task, desc in table:
        paper = "Table 1 (M3D-Bench)" if name.startswith("m3d") else "Table 2 (Uni-Med tasks)"
        reg.register(Benchmark(name=name, description=desc, evaluate=_named(fn, name), task=task,
                               paper=paper))
    return reg


REGISTRY = _builtin()


def get_benchmark(name: str) -> Benchmark:
    return REGISTRY.get(name)


def benchmark_names() -> list[str]:
    return REGISTRY.names()
