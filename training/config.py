"""Training configuration: typed schema, YAML loading with ``key=value`` overrides, validation.

A config file is YAML with the top-level sections ``model``, ``tune``, ``data``, ``train``,
``log`` (and ``name``, ``seed``). Every field is documented in ``training/configs/README.md``.
Overrides use dotted keys (``train.lr=2e-5``, ``tune.lora.r=16``, ``data.datasets.0.ratio=0.5``);
values are parsed as YAML scalars/lists (``tune.lora.target_modules=[q_proj,v_proj]``).
``validate_config`` gathers every problem and raises one :class:`ConfigError`.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from medmvl_core.errors import ConfigError

logger = logging.getLogger(__name__)

_REPO_ROOT = Path(__file__).resolve().parent.parent

LLM_TUNE_TYPES = ("frozen", "lora", "qlora", "full")
MODULE_TUNE_TYPES = ("frozen", "full")
PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULERS = ("cosine", "linear", "constant")
ATTN_CHOICES = ("auto", "sdpa", "eager", "flash_attention_2")  # auto: flash_attention_2 where installed, else sdpa
BAD_ROW_POLICIES = ("error", "skip")


@dataclass
class ComponentConfig:
    """One model part (LLM, encoder or connector).

    Weights come from exactly one of ``path`` (a local HF-format folder with config + weights),
    ``preset`` (a named architecture from ``medmvl_core.model`` presets, random init unless
    ``path`` is given too) or ``config`` (a raw config dict: built from scratch, random init).
    ``type`` names the encoder/connector family (``siglip``, ``clip``, ``m3dclip``, ``mlp``,
    ``attn_pooling``, ``spatial_pooling``...); ``options`` are passed through to the model config
    (``select_layer``, ``select_feature``, ``name`` of an MLP connector, pooling sizes...).
    """

    type: Optional[str] = None
    path: Optional[str] = None
    preset: Optional[str] = None
    config: Optional[dict] = None
    options: dict = field(default_factory=dict)


@dataclass
class ModelConfig:
    """What to train. ``init_from`` (any checkpoint ``load_checkpoint`` reads) wins over the parts."""

    init_from: Optional[str] = None
    llm: Optional[ComponentConfig] = None
    tokenizer: Optional[str] = None
    encoder_image: Optional[ComponentConfig] = None
    encoder_image3d: Optional[ComponentConfig] = None
    connector_image: Optional[ComponentConfig] = None
    connector_image3d: Optional[ComponentConfig] = None
    template: str = "qwen2"
    max_length: Optional[int] = None  # default: the init_from checkpoint's, else 2048
    padding_side: str = "right"
    preprocessing: Optional[dict] = None
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2 | auto (flash_attention_2 where installed)
    box_refs: Optional[list] = None  # finding labels whose boxes the LLM names by one token (medmvl_core/model/box_refs.py)


@dataclass
class LoraConfig:
    r: int = 128
    alpha: int = 256
    dropout: float = 0.05
    # null = peft's default for the LLM's model type (Qwen2 / Llama: q_proj, v_proj), what MedM-VL's
    # LoRA examples get since they pass no target modules
    target_modules: Optional[list] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


@dataclass
class QLoraConfig:
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"


@dataclass
class TuneConfig:
    """How each part trains: LLM frozen|lora|qlora|full, encoders/connectors frozen|full."""

    llm: str = "frozen"
    encoder_image: str = "frozen"
    encoder_image3d: str = "frozen"
    connector_image: str = "full"
    connector_image3d: str = "full"
    lora: LoraConfig = field(default_factory=LoraConfig)
    qlora: QLoraConfig = field(default_factory=QLoraConfig)


@dataclass
class DatasetConfig:
    """One MedM-VL JSON file; image paths in it are relative to ``image_dir`` / ``image3d_dir``."""

    path: str = ""
    image_dir: Optional[str] = None
    image3d_dir: Optional[str] = None
    ratio: float = 1.0


@dataclass
class DataConfig:
    datasets: list = field(default_factory=list)       # list[DatasetConfig]
    eval_datasets: list = field(default_factory=list)  # list[DatasetConfig]
    template: Optional[str] = None  # chat template for the data (stage 1: "pretrain"); default model.template
    on_bad_row: str = "error"
    augment: bool = False            # 3D train augmentation: rot90 in (H, W) with p=0.5, then flips
    augment_flip_p: float = 0.5      # probability of the flip of each of D, H, W (MedM-VL: 0.1)
    augment_intensity: bool = False  # also MONAI RandScaleIntensity(0.1, p=0.5) + RandShiftIntensity(0.1, p=0.5)
    cache_encoder_outputs: bool = False
    cache_dir: Optional[str] = None
    pixel_cache: bool = False        # preprocessed images/volumes cached on disk (.npy, keyed by file + spec)
    pixel_cache_dir: Optional[str] = None  # default OUTPUT/pixel_cache; share it between runs and ranks
    independent_turns: bool = False  # train each turn of a multi-turn row as if asked alone (encode_train_turns)
    multi_turn_share: float = 0.0    # with independent_turns: this share of rows (per row and epoch) stays multi-turn
    shuffle_choices: bool = False    # multiple-choice options "(a) X (b) Y ..." in a new order per row and epoch


@dataclass
class TrainConfig:
    output_dir: str = "runs/medmvl"
    epochs: float = 1.0
    max_steps: int = -1
    micro_batch_size: int = 1
    grad_accum: int = 1
    global_batch: int = 0       # the global batch the recipe was tuned for (0 = not stated); a run whose
                                # micro_batch_size x grad_accum x processes differs warns (or adapts)
    adapt_grad_accum: bool = False  # with global_batch: set grad_accum so the run's global batch equals it
    lr: float = 1e-4
    weight_decay: float = 0.0
    adam_betas: list = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    warmup_ratio: float = 0.03
    scheduler: str = "cosine"
    max_grad_norm: float = 1.0
    precision: str = "bf16"
    gradient_checkpointing: bool = False
    save_every: int = 500
    save_total_limit: int = 2
    eval_every: int = 0
    save_adapter_only: bool = True
    merge_at_end: bool = False
    stop_after: int = 0         # > 0: stop (after a checkpoint) once this invocation ran so many steps; --resume continues
    num_workers: int = 0        # DataLoader worker processes
    dist_timeout_s: int = 1800  # a collective waiting this long for another process fails (no endless hang)
    save_final: bool = True     # false: no final/ (throughput benchmarks)


@dataclass
class LogConfig:
    every: int = 10
    tensorboard: bool = True
    progress_bar: bool = True
    peak_tflops: Optional[float] = None
    loss_curve: bool = True


@dataclass
class RunConfig:
    name: str = "medmvl"
    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    base_dir: Optional[str] = None  # folder relative paths resolve against (the YAML's folder); set by the loader

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("base_dir", None)
        return d

    def resolve_path(self, p: Optional[str]) -> Optional[Path]:
        return resolve_config_path(p, self.base_dir)


def resolve_config_path(p: Optional[str], base_dir: Optional[str]) -> Optional[Path]:
    """Resolve a path from a config: absolute stays; relative is tried against the current folder,
    then the YAML's folder (``base_dir``), then the repository root."""
    if p is None:
        return None
    path = Path(p).expanduser()
    if path.is_absolute() or path.exists() or base_dir is None:
        return path
    for root in (Path(base_dir), _REPO_ROOT):
        if (root / path).exists():
            return root / path
    return path


_LIST_ITEM_TYPES = {("DataConfig", "datasets"): DatasetConfig, ("DataConfig", "eval_datasets"): DatasetConfig}


def _is_optional(tp) -> tuple[bool, Any]:
    if get_origin(tp) is Union:
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return True, args[0]
    return False, tp


def _build(cls, data: Any, where: str, problems: list[str]):
    """Build dataclass ``cls`` from a mapping, collecting unknown keys and type problems."""
    if data is None:
        return cls()
    if not isinstance(data, dict):
        problems.append(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
        return cls()
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in names or key == "base_dir":
            problems.append(f"{where + '.' if where else ''}{key}: unknown key (allowed: {', '.join(sorted(names - {'base_dir'}))})")
            continue
        kwargs[key] = _coerce(hints[key], value, f"{where + '.' if where else ''}{key}", problems,
                              item_type=_LIST_ITEM_TYPES.get((cls.__name__, key)))
    return cls(**kwargs)


def _coerce(tp, value, where: str, problems: list[str], item_type=None):
    optional, inner = _is_optional(tp)
    if value is None:
        if not optional:
            problems.append(f"{where}: must not be null")
        return None
    if dataclasses.is_dataclass(inner):
        return _build(inner, value, where, problems)
    if inner is bool:
        if not isinstance(value, bool):
            problems.append(f"{where}: expected true/false, got {value!r}")
        return value
    if inner in (int, float):
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            problems.append(f"{where}: expected a number, got {value!r}")
            return value
        try:
            num = float(value) if inner is float else int(value)
            if inner is int and isinstance(value, float) and value != int(value):
                raise ValueError
            return num
        except (TypeError, ValueError):
            problems.append(f"{where}: expected {'an integer' if inner is int else 'a number'}, got {value!r}")
            return value
    if inner is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            problems.append(f"{where}: expected a string, got {value!r}")
        return str(value)
    if inner is list or get_origin(inner) is list:
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {value!r}")
            return value
        if item_type is not None:
            return [_build(item_type, v, f"{where}.{i}", problems) for i, v in enumerate(value)]
        return list(value)
    if inner is dict:
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {value!r}")
        return value
    return value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides to a raw config dict (a copy is returned).

    Numeric path parts index lists (``data.datasets.0.ratio=2``). Values are YAML-parsed.
    """
    out = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value; write e.g. train.lr=2e-5")
        key, text = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"override {item!r} has an empty key")
        try:
            value = yaml.safe_load(text) if text.strip() != "" else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc})") from exc
        node: Any = out
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                node = node[_list_index(node, part, item)]
                continue
            if node.get(part) is None:
                node[part] = [] if parts[i + 1].isdigit() else {}
            node = node[part]
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[:i + 1])} is a value, not a section")
        last = parts[-1]
        if isinstance(node, list):
            idx = int(last) if last.isdigit() else -1
            if idx == len(node):
                node.append(value)
            else:
                node[_list_index(node, last, item)] = value
        else:
            node[last] = value
    return out


def _list_index(node: list, part: str, item: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override {item!r}: {part!r} is not an index of a list of {len(node)} items")
    return int(part)


def read_yaml_config(path: str | Path | None, overrides: list[str] | None = None) -> tuple[dict, Optional[str]]:
    """(raw mapping with ``overrides`` applied, the YAML's folder or None) of a config file."""
    raw: dict = {}
    base_dir = None
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist; pass a YAML file such as training/configs/tiny_ct_cpu.yaml")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        base_dir = str(p.resolve().parent)
    return apply_overrides(raw, list(overrides or [])), base_dir


def load_config(path: str | Path | None, overrides: list[str] | None = None, *, validate: bool = True) -> RunConfig:
    """Read a YAML config, apply overrides, build and (by default) validate a :class:`RunConfig`."""
    raw, base_dir = read_yaml_config(path, overrides)
    if raw.get("kind") == "encoder_pretrain":
        raise ConfigError(f"{path} is an encoder pretraining config; run it with "
                          f"'medmvl-train encoder --config {path}'")
    problems: list[str] = []
    cfg = _build(RunConfig, raw, "", problems)
    cfg.base_dir = base_dir
    if problems:
        raise ConfigError("invalid training config:\n  " + "\n  ".join(problems))
    if validate:
        validate_config(cfg)
    return cfg


def config_problems(cfg: RunConfig) -> list[str]:
    """Every semantic problem of a config (empty when valid). Does not touch the file system."""
    p: list[str] = []
    m, t, d, tr = cfg.model, cfg.tune, cfg.data, cfg.train
    if m.init_from is None and m.llm is None:
        p.append("model: set model.init_from (a checkpoint) or model.llm (path/preset/config)")
    for name in ("llm", "encoder_image", "encoder_image3d", "connector_image", "connector_image3d"):
        comp = getattr(m, name)
        if comp is None:
            continue
        if name != "llm" and name.startswith("encoder") and comp.type is None:
            p.append(f"model.{name}.type: required (e.g. siglip, clip, m3dclip)")
        if name.startswith("connector") and comp.type is None:
            p.append(f"model.{name}.type: required (mlp, attn_pooling, spatial_pooling)")
        if comp.config is not None and comp.preset is not None:
            p.append(f"model.{name}: give either preset or config, not both")
        if name == "llm" and m.init_from is None and not (comp.path or comp.preset or comp.config):
            p.append("model.llm: give path, preset or config")
    if m.init_from is None and m.llm is not None and m.llm.path is None and m.tokenizer is None:
        p.append("model.tokenizer: required when the LLM is not loaded from a folder (give a tokenizer folder)")
    if m.padding_side not in ("left", "right"):
        p.append(f"model.padding_side: {m.padding_side!r} is not left/right")
    if m.attn_implementation not in ATTN_CHOICES:
        p.append(f"model.attn_implementation: {m.attn_implementation!r} is not one of {', '.join(ATTN_CHOICES)}")
    if m.max_length is not None and m.max_length < 8:
        p.append(f"model.max_length: {m.max_length} is too small")
    if t.llm not in LLM_TUNE_TYPES:
        p.append(f"tune.llm: {t.llm!r} is not one of {', '.join(LLM_TUNE_TYPES)}")
    for name in ("encoder_image", "encoder_image3d", "connector_image", "connector_image3d"):
        v = getattr(t, name)
        if v not in MODULE_TUNE_TYPES:
            p.append(f"tune.{name}: {v!r} is not one of {', '.join(MODULE_TUNE_TYPES)}")
    if t.lora.r < 1:
        p.append(f"tune.lora.r: must be >= 1, got {t.lora.r}")
    if not 0 <= t.lora.dropout < 1:
        p.append(f"tune.lora.dropout: must be in [0, 1), got {t.lora.dropout}")
    if t.lora.target_modules is not None and not t.lora.target_modules:
        p.append("tune.lora.target_modules: give at least one module name (or null for peft's default)")
    if t.qlora.quant_type not in ("nf4", "fp4"):
        p.append(f"tune.qlora.quant_type: {t.qlora.quant_type!r} is not nf4/fp4")
    if t.qlora.compute_dtype not in ("float32", "bfloat16", "float16"):
        p.append(f"tune.qlora.compute_dtype: {t.qlora.compute_dtype!r} is not float32/bfloat16/float16")
    if not d.datasets:
        p.append("data.datasets: give at least one dataset (path, image_dir/image3d_dir, ratio)")
    for key in ("datasets", "eval_datasets"):
        for i, ds in enumerate(getattr(d, key)):
            if not ds.path:
                p.append(f"data.{key}.{i}.path: required")
            if ds.ratio <= 0:
                p.append(f"data.{key}.{i}.ratio: must be > 0, got {ds.ratio}")
    if not 0 <= d.multi_turn_share <= 1:
        p.append(f"data.multi_turn_share: must be in [0, 1], got {d.multi_turn_share}")
    elif d.multi_turn_share and not d.independent_turns:
        p.append("data.multi_turn_share: only applies with data.independent_turns=true")
    if d.on_bad_row not in BAD_ROW_POLICIES:
        p.append(f"data.on_bad_row: {d.on_bad_row!r} is not error/skip")
    if d.cache_encoder_outputs:
        for enc in ("encoder_image", "encoder_image3d"):
            if getattr(t, enc) != "frozen":
                p.append(f"data.cache_encoder_outputs: needs tune.{enc}=frozen (a training encoder changes its outputs)")
        if d.augment:
            p.append("data.cache_encoder_outputs: augmentation changes every image; set data.augment=false")
    if tr.epochs <= 0 and tr.max_steps <= 0:
        p.append("train: set train.epochs > 0 or train.max_steps > 0")
    for k in ("micro_batch_size", "grad_accum"):
        if getattr(tr, k) < 1:
            p.append(f"train.{k}: must be >= 1")
    if tr.lr <= 0:
        p.append(f"train.lr: must be > 0, got {tr.lr}")
    if not 0 <= tr.warmup_ratio < 1:
        p.append(f"train.warmup_ratio: must be in [0, 1), got {tr.warmup_ratio}")
    if tr.scheduler not in SCHEDULERS:
        p.append(f"train.scheduler: {tr.scheduler!r} is not one of {', '.join(SCHEDULERS)}")
    if tr.precision not in PRECISIONS:
        p.append(f"train.precision: {tr.precision!r} is not one of {', '.join(PRECISIONS)}")
    if len(tr.adam_betas) != 2:
        p.append("train.adam_betas: give two numbers")
    if not 0 <= d.augment_flip_p <= 1:
        p.append(f"data.augment_flip_p: must be in [0, 1], got {d.augment_flip_p}")
    if tr.global_batch < 0:
        p.append(f"train.global_batch: must be >= 0 (0 = not stated), got {tr.global_batch}")
    elif tr.adapt_grad_accum and tr.global_batch == 0:
        p.append("train.adapt_grad_accum: needs train.global_batch (the global batch to keep)")
    if tr.dist_timeout_s < 1:
        p.append(f"train.dist_timeout_s: must be >= 1 second, got {tr.dist_timeout_s}")
    if tr.stop_after < 0 or tr.num_workers < 0:
        p.append("train.stop_after / train.num_workers: must be >= 0")
    if tr.save_every < 0 or tr.eval_every < 0:
        p.append("train.save_every / train.eval_every: must be >= 0 (0 = off)")
    if tr.eval_every > 0 and not d.eval_datasets:
        p.append("train.eval_every: set data.eval_datasets too")
    if tr.merge_at_end and t.llm not in ("lora", "qlora"):
        p.append("train.merge_at_end: only for tune.llm=lora/qlora")
    try:  # template names, when the processing package is importable (it does not import torch)
        from medmvl_core.processing.templates import TEMPLATES
    except ImportError:
        TEMPLATES = None
    if TEMPLATES is not None:
        for where, name in (("model.template", m.template), ("data.template", d.template)):
            if name is not None and name not in TEMPLATES:
                p.append(f"{where}: {name!r} is not a template; use one of {', '.join(sorted(TEMPLATES))}")
    if cfg.log.every < 1:
        p.append("log.every: must be >= 1")
    if cfg.log.peak_tflops is not None and cfg.log.peak_tflops <= 0:
        p.append("log.peak_tflops: must be > 0")
    trainable = [t.llm != "frozen"] + [getattr(t, n) == "full" for n in
                                       ("encoder_image", "encoder_image3d", "connector_image", "connector_image3d")]
    if not any(trainable):
        p.append("tune: every part is frozen; nothing would train")
    return p


def validate_config(cfg: RunConfig) -> None:
    """Raise one :class:`ConfigError` listing every problem of ``cfg``."""
    problems = config_problems(cfg)
    if problems:
        raise ConfigError("invalid training config:\n  " + "\n  ".join(problems))


def resolve_attn_implementation(name: str) -> str:
    """``auto`` -> ``flash_attention_2`` when flash-attn is installed and a GPU is present, else ``sdpa``
    (MedM-VL trained with FlashAttention-2; sdpa gives the same results up to rounding)."""
    if name != "auto":
        return name
    import importlib.util

    try:
        import torch

        gpu = torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a training dependency
        gpu = False
    return "flash_attention_2" if gpu and importlib.util.find_spec("flash_attn") is not None else "sdpa"


def plan_global_batch(tr: TrainConfig, world: int) -> tuple[int, Optional[str]]:
    """The gradient accumulation to run with on ``world`` processes, and a warning (or None).

    ``train.global_batch`` states the batch a recipe was tuned for (its learning rate goes with it).
    A launch with another number of processes changes ``micro_batch_size x grad_accum x world``; then
    with ``adapt_grad_accum`` the accumulation is recomputed when it divides evenly, otherwise the
    returned message says what the run will do and how to match the recipe.
    """
    run = tr.micro_batch_size * tr.grad_accum * world
    if tr.global_batch <= 0 or run == tr.global_batch:
        return tr.grad_accum, None
    per_step = tr.micro_batch_size * world
    if tr.adapt_grad_accum and tr.global_batch % per_step == 0:
        accum = tr.global_batch // per_step
        return accum, (f"train.global_batch {tr.global_batch}: {world} process(es) x micro batch "
                       f"{tr.micro_batch_size}; gradient accumulation set to {accum} (config: {tr.grad_accum})")
    hint = (f"set train.grad_accum={tr.global_batch // per_step}" if tr.global_batch % per_step == 0 else
            f"no whole accumulation gives it with {world} process(es) x micro batch {tr.micro_batch_size}; "
            "change train.micro_batch_size or the process count")
    return tr.grad_accum, (f"this run's global batch is {run} ({tr.micro_batch_size} x {tr.grad_accum} accumulation "
                           f"x {world} process(es)) but the recipe was tuned for train.global_batch="
                           f"{tr.global_batch} at lr {tr.lr:g}; {hint}, or set train.adapt_grad_accum=true")
