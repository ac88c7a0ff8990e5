"""The training recipe (setup / train / save / cleanup) used by ``medmvl-train`` for every stage.

One loop serves pretraining (connector only), LoRA/QLoRA and full finetuning, on one CPU/GPU or
many processes (accelerate: DDP, DeepSpeed ZeRO-2/3, FSDP). The loss of a step is the sum of the
token losses of the whole global batch divided by its number of supervised tokens, so the curve
does not depend on how the global batch is split over processes and accumulation steps.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Optional

import torch
import yaml

from medmvl_core.errors import ConfigError, DataError
from training import state as st
from training.build import build_model
from training.callbacks import RunLogger, ThroughputMeter, peak_tflops_for_device, step_flops, write_loss_curve
from training.config import RunConfig, plan_global_batch
from training.distributed import enable_requested_engine, fit_fsdp_wrap_classes, is_peer_failure, peer_lost, \
    whole_model_init
from training.data import KeyedCollator, load_train_data, make_dataset, move_batch, rank_micro_batches
from training.encoder_cache import EncoderCache
from training.step import TrainStepModule
from training.tuning import apply_tuning, cast_frozen, enable_gradient_checkpointing, trainable_summary, \
    unpack_4bit_for_training

logger = logging.getLogger(__name__)

_MIXED = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def lr_lambda(total: int, warmup: int, kind: str):
    """Multiplier of the base lr at scheduler step ``s``: linear warm-up, then cosine/linear/constant."""
    def f(s: int) -> float:
        if warmup > 0 and s < warmup:
            return (s + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return f


class Recipe:
    """Training run for one :class:`RunConfig`."""

    def __init__(self, cfg: RunConfig, resume: Optional[str] = None):
        self.cfg = cfg
        self.resume = resume
        self.out = cfg.resolve_path(cfg.train.output_dir) if Path(cfg.train.output_dir).is_absolute() \
            else Path(cfg.train.output_dir)
        self.step = 0
        self.lora = None

    # -- setup --------------------------------------------------------------------------------------
    def setup(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, DistributedType, InitProcessGroupKwargs, set_seed

        cfg, tr = self.cfg, self.cfg.train
        # the process count is known from the launcher's environment before accelerate starts, and the
        # accumulation must be fixed before (accelerate divides the backward loss by it)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        accum, msg = plan_global_batch(tr, world)
        if msg:
            logger.warning(msg)
        tr.grad_accum = accum
        ddp_kwargs = DistributedDataParallelKwargs(find_unused_parameters=True)
        # a peer that hangs (rather than dies) fails the next collective after this long
        pg_kwargs = InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=tr.dist_timeout_s))
        # without a GPU, accelerate needs cpu=True to run several processes (gloo) under torchrun
        self.acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=_MIXED[tr.precision],
                               kwargs_handlers=[ddp_kwargs, pg_kwargs],
                               gradient_accumulation_steps=tr.grad_accum)
        self.engine = enable_requested_engine(self.acc)
        set_seed(cfg.seed)
        if self.acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        with whole_model_init():  # ZeRO-3 partitions in prepare, not at construction
            model, processor = build_model(cfg)
        if cfg.model.max_length is not None:
            processor.max_length = cfg.model.max_length
        elif processor.max_length is None:
            processor.max_length = 2048
        model.config.max_length = processor.max_length
        self.processor = processor
        self.max_length = processor.max_length
        # issue 10's convention: N = every LLM parameter (a tied embedding counted once)
        self.n_llm = sum(p.numel() for p in model.llm.parameters())
        self.n_enc = {k: sum(p.numel() for p in getattr(model, f"encoder_{k}").parameters())
                      for k in ("image", "image3d") if getattr(model, f"encoder_{k}", None) is not None}
        self.base_dir = self._base_for_adapter(model)
        with whole_model_init():
            self.lora = apply_tuning(model, cfg, device=self.acc.device)
        # (not under FSDP: a flat-parameter unit must hold one dtype)
        if self.lora is not None and tr.save_adapter_only and tr.precision in ("bf16", "fp16") and \
                self.acc.distributed_type != DistributedType.FSDP:
            # frozen weights are never saved from this model (the adapter is): keep them in half precision
            n = cast_frozen(model, torch.bfloat16 if tr.precision == "bf16" else torch.float16)
            logger.info("frozen parameters stored in %s: %d", tr.precision, n)
        if tr.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        self.model = model
        logger.info("trainable parameters: %s", trainable_summary(model))

        data_proc = processor
        if cfg.data.template and cfg.data.template != processor.template.name:
            from medmvl_core.processing import MedMVLProcessor

            data_proc = MedMVLProcessor(processor.tokenizer, template=cfg.data.template,
                                        num_image_tokens=processor.num_image_tokens,
                                        preprocessing=processor.preprocessing, padding_side="right",
                                        max_length=self.max_length)
        self.data_proc = data_proc
        self.cache = self._encoder_cache(model)
        box_refs = getattr(model.config, "box_refs", None)
        self.data = load_train_data(cfg, data_proc, self.max_length, box_refs=box_refs)
        self.pixel_cache = None
        if cfg.data.pixel_cache:
            from medmvl_core.data.streaming import PixelCache

            root = cfg.resolve_path(cfg.data.pixel_cache_dir) if cfg.data.pixel_cache_dir else self.out / "pixel_cache"
            self.pixel_cache = PixelCache(root)
        self.dataset = make_dataset(self.data.records, data_proc, cfg, self.max_length, self.cache,
                                    self.data.encodings, self.pixel_cache)
        self.eval_data = load_train_data(cfg, data_proc, self.max_length, "eval_datasets", box_refs) \
            if cfg.data.eval_datasets else None
        world = self.acc.num_processes
        self.global_batch = tr.micro_batch_size * tr.grad_accum * world
        self.steps_per_epoch = self.data.epoch_len // self.global_batch
        if self.steps_per_epoch == 0:
            raise DataError(f"one epoch has {self.data.epoch_len} samples, fewer than one global batch "
                            f"({tr.micro_batch_size} x {tr.grad_accum} accumulation x {world} processes); "
                            "use more data, a larger data ratio, or a smaller batch")
        self.total_steps = tr.max_steps if tr.max_steps > 0 else max(1, math.ceil(tr.epochs * self.steps_per_epoch))

        params = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": tr.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=tr.lr, betas=tuple(tr.adam_betas), eps=tr.adam_eps)
        warmup = int(round(tr.warmup_ratio * self.total_steps))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(self.total_steps, warmup,
                                                                                     tr.scheduler))
        self._configure_deepspeed()
        fit_fsdp_wrap_classes(self.acc, model)
        self.step_module, self.optimizer = self.acc.prepare(TrainStepModule(model), self.optimizer)
        self.samples_seen = self.tokens_seen = 0
        if self.resume:
            ckpt = st.find_resume_dir(self.out, self.resume)
            if ckpt is None:
                logger.warning("--resume: no checkpoint in %s yet; starting from the beginning", self.out)
            else:
                meta = st.load_state(ckpt, self.acc, model, self.optimizer, self.scheduler)
                if meta.get("global_batch") != self.global_batch:
                    raise ConfigError(f"{ckpt} was trained with a global batch of {meta.get('global_batch')}, "
                                      f"this run has {self.global_batch}; resume with the same batch settings")
                self.step = int(meta["global_step"])
                self.samples_seen, self.tokens_seen = meta.get("samples_seen", 0), meta.get("tokens_seen", 0)
                logger.info("resumed from %s at step %d", ckpt, self.step)
        peak = cfg.log.peak_tflops
        if peak is None and torch.cuda.is_available():
            peak = peak_tflops_for_device(torch.cuda.get_device_name())
        self.meter = ThroughputMeter(world_size=world, peak_tflops=peak)

    def _configure_deepspeed(self) -> None:
        """Fill DeepSpeed's batch/accumulation/clipping entries from the run config (no dataloader is
        prepared: batches are planned by the recipe)."""
        plugin = getattr(self.acc.state, "deepspeed_plugin", None)
        if plugin is None:
            return
        tr = self.cfg.train
        ds = plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = tr.micro_batch_size
        ds["gradient_accumulation_steps"] = tr.grad_accum
        ds["train_batch_size"] = self.global_batch
        ds["gradient_clipping"] = tr.max_grad_norm
        # ZeRO's "auto" sizes, as transformers' Trainer fills them from the LLM's hidden size (accelerate
        # would look for a `config` on the prepared module, which the step module does not have)
        hidden = int(getattr(self.model.config.llm_config, "hidden_size", 0) or 0)
        zero = ds.get("zero_optimization", {})
        for key, value in (("reduce_bucket_size", hidden * hidden),
                           ("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden)),
                           ("stage3_param_persistence_threshold", 10 * hidden)):
            if zero.get(key) == "auto" and hidden:
                zero[key] = value
        ds.setdefault("zero_allow_untested_optimizer", True)  # torch AdamW as DeepSpeed's client optimizer

    def _base_for_adapter(self, model: torch.nn.Module) -> Optional[Path]:
        """LoRA adapters refer to a base checkpoint: ``init_from``, or the initial model saved to OUTPUT/base."""
        if self.cfg.tune.llm not in ("lora", "qlora"):
            return None
        if self.cfg.model.init_from:
            return self.cfg.resolve_path(self.cfg.model.init_from).resolve()
        base = (self.out / "base").resolve()
        if self.acc.is_main_process:
            model.save_pretrained(str(base), safe_serialization=True)
            self.processor.save_pretrained(str(base))
        self.acc.wait_for_everyone()
        return base

    def _encoder_cache(self, model: torch.nn.Module) -> Optional[EncoderCache]:
        if not self.cfg.data.cache_encoder_outputs:
            return None
        h = hashlib.sha256()
        for k in ("encoder_image", "encoder_image3d"):
            enc = getattr(model, k, None)
            if enc is not None:
                h.update(json.dumps(getattr(model.config, k), sort_keys=True, default=str).encode())
                for n, p in enc.state_dict().items():
                    h.update(n.encode())
                    h.update(p.detach().float().cpu().numpy().tobytes())
        root = self.cfg.resolve_path(self.cfg.data.cache_dir) if self.cfg.data.cache_dir else self.out / "encoder_cache"
        return EncoderCache(root, tag=h.hexdigest()[:16])

    # -- training -------------------------------------------------------------------------------------
    def _loader(self, epoch: int, start_step: int):
        order = self.data.epoch_order(epoch, self.cfg.seed)
        tr, acc = self.cfg.train, self.acc
        batches = []
        for s in range(start_step, self.steps_per_epoch):
            batches.extend(rank_micro_batches(order, s, tr.micro_batch_size, tr.grad_accum, acc.num_processes,
                                              acc.process_index))
        self.dataset.epoch = epoch
        # an own generator: creating the iterator must not draw from the global RNG (dropout), or a
        # resumed run (new iterator mid-epoch) would diverge from an uninterrupted one
        gen = torch.Generator().manual_seed(self.cfg.seed * 1000 + epoch)
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=batches, collate_fn=KeyedCollator(self.data_proc),
                                           num_workers=tr.num_workers, generator=gen)

    def _micro_step(self, batch: dict, scale: float, sync: bool) -> torch.Tensor:
        inputs, pending = move_batch(batch, self.acc.device, self.cache)
        ctx = contextlib.nullcontext() if sync else self.acc.no_sync(self.step_module)
        with ctx:
            with self.acc.autocast():
                loss_sum, _, new = self.step_module(**inputs)
            self.acc.backward(loss_sum * scale)
        enc_tokens = {k: sum(int(f.shape[0] * f.shape[1]) for f in v) for k, v in new.items()}
        if self.cache is not None:
            for kind, feats in new.items():
                for key, f in zip(pending[kind], feats):
                    if key is not None:
                        self.cache.put(key, f)
        self._enc_tokens = {k: self._enc_tokens.get(k, 0) + v for k, v in enc_tokens.items()}
        return loss_sum.detach()

    def train(self) -> dict:
        from accelerate.utils import DistributedType

        cfg, tr, acc = self.cfg, self.cfg.train, self.acc
        self.log = RunLogger(self.out, self.total_steps, self.step, tensorboard=cfg.log.tensorboard,
                             progress_bar=cfg.log.progress_bar, enabled=acc.is_main_process)
        self.step_module.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        if acc.distributed_type == DistributedType.FSDP:  # accelerate clips FSDP shards given all parameters
            params = list(self.step_module.parameters())
        last_loss = None
        # accelerate (and DeepSpeed) divide the backward loss by grad_accum; undo that so the gradient
        # is exactly d(sum of token losses of the global batch / its supervised tokens)
        acc_scale = acc.num_processes * tr.grad_accum
        stopped_early = False
        start_step = self.step
        while self.step < self.total_steps:
            epoch, in_epoch = divmod(self.step, self.steps_per_epoch)
            it = iter(self._loader(epoch, in_epoch))
            for _ in range(in_epoch, self.steps_per_epoch):
                if self.step >= self.total_steps:
                    break
                micro = [next(it) for _ in range(tr.grad_accum)]
                local = torch.tensor([float((b["labels"][:, 1:] != -100).sum()) for b in micro]).sum()
                counts = acc.reduce(local.to(acc.device), "sum")
                n_sup = float(counts)
                scale = acc_scale / max(n_sup, 1.0)
                self._enc_tokens = {}
                loss_sum = torch.zeros((), device=acc.device)
                for a, b in enumerate(micro):
                    loss_sum += self._micro_step(b, scale, sync=(a == len(micro) - 1))
                if tr.max_grad_norm > 0:
                    grad_norm = acc.clip_grad_norm_(params, tr.max_grad_norm)
                else:
                    grad_norm = None
                lr = self.scheduler.get_last_lr()[0]  # the lr this step used
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                stats = torch.tensor([float(loss_sum), float(sum(b["n_samples"] for b in micro)),
                                      float(sum(int(b["attention_mask"].sum()) for b in micro)),
                                      float(self._enc_tokens.get("image", 0)), float(self._enc_tokens.get("image3d", 0))],
                                     device=acc.device)
                stats = acc.reduce(stats, "sum").cpu()
                last_loss = float(stats[0]) / max(n_sup, 1.0)
                samples, tokens = int(stats[1]), int(stats[2])
                self.samples_seen += samples
                self.tokens_seen += tokens
                encs = [(self.n_enc[k], int(stats[3 + i]), self._trains(f"encoder_{k}"))
                        for i, k in enumerate(("image", "image3d")) if k in self.n_enc]
                self.meter.update(samples, tokens, step_flops(self.n_llm, tokens, encs))
                self.log.advance()
                if self.step % cfg.log.every == 0 or self.step == self.total_steps:
                    m = {"loss": last_loss, "lr": lr, "epoch": self.step / self.steps_per_epoch}
                    if grad_norm is not None:
                        m["grad_norm"] = float(grad_norm)
                    m.update(self.meter.rates())
                    if self.cache is not None:
                        m["cache_hits"], m["cache_misses"] = self.cache.hits, self.cache.misses
                    self.log.log(self.step, m)
                if tr.eval_every > 0 and self.eval_data is not None and self.step % tr.eval_every == 0:
                    self.log.log(self.step, {"loss": self.evaluate()}, prefix="eval")
                if tr.save_every > 0 and self.step % tr.save_every == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
                if tr.stop_after > 0 and self.step - start_step >= tr.stop_after and self.step < self.total_steps:
                    if not (tr.save_every > 0 and self.step % tr.save_every == 0):
                        self.save_checkpoint()
                    stopped_early = True
                    break
            if stopped_early:
                break
        self.log.close()
        return {"steps": self.step, "final_loss": last_loss, "stopped_early": stopped_early}

    def _trains(self, part: str) -> bool:
        mod = getattr(self.model, part, None)
        return mod is not None and any(p.requires_grad for p in mod.parameters())

    @torch.no_grad()
    def evaluate(self) -> float:
        """Token-weighted mean loss over the eval datasets; the model is back in train mode afterwards
        (and 4-bit layers repacked for training, see ``unpack_4bit_for_training``)."""
        acc, tr = self.acc, self.cfg.train
        self.step_module.eval()
        ds = make_dataset(self.eval_data.records, self.data_proc, self.cfg, self.max_length, None,
                          self.eval_data.encodings)
        ds.shuffle_choices = False  # evaluation reads the questions as written
        idx = list(range(len(ds)))[acc.process_index::acc.num_processes]
        batches = [idx[i:i + tr.micro_batch_size] for i in range(0, len(idx), tr.micro_batch_size)]
        loader = torch.utils.data.DataLoader(ds, batch_sampler=batches, collate_fn=KeyedCollator(self.data_proc),
                                             generator=torch.Generator().manual_seed(self.cfg.seed))
        total = torch.zeros(2, device=acc.device)
        for b in loader:
            inputs, _ = move_batch(b, acc.device, None)
            with acc.autocast():
                loss_sum, n, _ = self.step_module(**inputs)
            total += torch.stack([loss_sum.float(), n.float()])
        total = acc.reduce(total, "sum")
        self.step_module.train()
        unpack_4bit_for_training(self.model)
        return float(total[0] / total[1].clamp(min=1))

    # -- saving ---------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        meta = {"global_step": self.step, "samples_seen": self.samples_seen, "tokens_seen": self.tokens_seen,
                "global_batch": self.global_batch, "seed": self.cfg.seed, "steps_per_epoch": self.steps_per_epoch,
                "total_steps": self.total_steps, "epoch": self.step / self.steps_per_epoch}
        path = st.save_state(self.out / "checkpoints" / f"step-{self.step}", self.acc, self.step_module, self.model,
                             self.optimizer, self.scheduler, meta)
        if self.acc.is_main_process:
            st.prune_checkpoints(self.out, self.cfg.train.save_total_limit)
        return path

    def save_final(self) -> Path:
        """Write the final outputs (see training/configs/README.md) and return the loadable checkpoint."""
        acc = self.acc
        state = acc.get_state_dict(self.step_module)  # gathers ZeRO-3 / FSDP shards on the main process
        final = self.out / "final"
        result = final
        if acc.is_main_process:
            state = {k[len("model."):] if k.startswith("model.") else k: v for k, v in state.items()}
            result = self._write_final(state, final)
        acc.wait_for_everyone()
        return result

    def _write_final(self, state: dict, final: Path) -> Path:
        """Main process: the consolidated outputs (adapter, merged model or full checkpoint)."""
        from training.merge import merge_adapter, save_adapter

        tr = self.cfg.train
        result = final
        with whole_model_init():  # the merge loads the base model: whole, never ZeRO-3-partitioned
            if self.lora is not None:
                adapter_dir = final if tr.save_adapter_only else self.out / "adapter"
                save_adapter(adapter_dir, self.model, state, self.lora, self.base_dir, self.processor, self.cfg)
                if tr.merge_at_end or not tr.save_adapter_only:
                    merged = self.out / ("merged" if tr.save_adapter_only else "final")
                    merge_adapter(adapter_dir, merged)
                    result = merged
                else:
                    result = adapter_dir
            else:
                self.model.save_pretrained(str(final), state_dict=state, safe_serialization=True)
                self.processor.save_pretrained(str(final))
        if self.cfg.log.loss_curve:
            write_loss_curve(self.out)
        return result

    def cleanup(self) -> None:
        self.acc.end_training()


def run(cfg: RunConfig, resume: Optional[str] = None, dry_run: bool = False) -> Optional[dict]:
    """Set up, train, save. Returns ``{"steps", "final_loss", "final_dir", "output_dir", ...}``."""
    t0 = time.perf_counter()
    recipe = Recipe(cfg, resume=resume)
    recipe.setup()
    if dry_run:
        logger.info("dry run: %d rows, %d steps of %d samples; nothing trained", len(recipe.data.records),
                    recipe.total_steps, recipe.global_batch)
        return {"steps": 0, "final_dir": None, "output_dir": str(recipe.out), "total_steps": recipe.total_steps}
    try:
        result = recipe.train()
    except Exception as exc:  # a collective failed because another process is gone: say so, do not hang
        acc = recipe.acc
        if acc.num_processes > 1 and is_peer_failure(exc):
            found = st.list_checkpoints(recipe.out)
            raise peer_lost(exc, acc.process_index, acc.num_processes, recipe.step,
                            found[-1] if found else None) from None
        raise
    result["output_dir"] = str(recipe.out)
    result["final_dir"] = None
    if not result["stopped_early"] and cfg.train.save_final:
        result["final_dir"] = str(recipe.save_final())
    result["seconds"] = time.perf_counter() - t0
    recipe.cleanup()
    return result
