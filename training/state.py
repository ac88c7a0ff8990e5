"""Resumable training state: trainable weights, optimizer, scheduler, RNG and data position.

Layout of ``OUTPUT/checkpoints/step-N/``:
``trainable.safetensors`` (every parameter with requires_grad, by name), ``optimizer.pt`` and
``scheduler.pt`` (torch.save of the state dicts; read back with ``weights_only=True``),
``rng_<rank>.pt`` (torch / CUDA / numpy / python RNG of each process), ``trainer_state.json``
(global step, samples and tokens seen, seed, global batch size — the data position follows from
the step because the data order is a pure function of seed and epoch).
Under DeepSpeed or FSDP, where weights and optimizer are sharded, ``accelerate``'s
``save_state``/``load_state`` write ``accelerate_state/`` instead of the first two files (FSDP with
``SHARDED_STATE_DICT``: ``pytorch_model_fsdp_0/`` and ``optimizer_0/`` in torch.distributed.checkpoint
format, one ``__<rank>_0.distcp`` per process; DeepSpeed: its ``global_step*/`` ZeRO partitions), and
``scheduler.pt`` is written beside it. Such a checkpoint resumes with the same number of processes.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from medmvl_core.errors import CheckpointError

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"


def _sharded(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)


def rng_state() -> dict:
    np_state = np.random.get_state()
    out = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                     "has_gauss": int(np_state[3]), "gauss": float(np_state[4])}}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def fill_optimizer_state(optimizer: Any) -> int:
    """Give every parameter of an Adam/AdamW optimizer a state, zero where it has none yet.

    A sharded (FSDP) checkpoint is written and read per parameter by torch.distributed.checkpoint,
    which expects a state for every parameter of the optimizer at load; a trainable parameter that
    never received a gradient (e.g. a vision tower's unused pooling head) has none, and loading fails
    with "Missing key in checkpoint state_dict: optimizer.state...". A zero state (step 0, moments 0)
    is what AdamW creates on that parameter's first gradient, so the run is unchanged.
    Returns the number of parameters filled.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
        return 0
    n = 0
    for group in inner.param_groups:
        for p in group["params"]:
            if inner.state.get(p):
                continue
            st = {"step": torch.zeros((), dtype=torch.float32),
                  "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                  "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
            if group.get("amsgrad"):
                st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            inner.state[p] = st
            n += 1
    return n


def save_state(ckpt_dir: Path, accelerator: Any, wrapped_model: Any, model: torch.nn.Module, optimizer: Any,
               scheduler: Any, meta: dict) -> Path:
    """Write a resumable checkpoint (all processes call this)."""
    from safetensors.torch import save_file

    ckpt_dir = Path(ckpt_dir)
    tmp = ckpt_dir.with_name(ckpt_dir.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if _sharded(accelerator):
        fill_optimizer_state(optimizer)
        accelerator.save_state(str(tmp / "accelerate_state"))
        if accelerator.is_main_process:  # the scheduler is not prepared by accelerate: saved here
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    elif accelerator.is_main_process:
        tensors = {n: p.detach().to("cpu").clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(tensors, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / f"rng_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(meta, indent=2))
        shutil.rmtree(ckpt_dir, ignore_errors=True)
        tmp.rename(ckpt_dir)
    accelerator.wait_for_everyone()
    return ckpt_dir


def load_state(ckpt_dir: Path, accelerator: Any, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> dict:
    """Restore a checkpoint written by :func:`save_state`; returns its ``trainer_state.json``."""
    from safetensors.torch import load_file

    ckpt_dir = Path(ckpt_dir)
    meta_file = ckpt_dir / STATE_FILE
    if not meta_file.is_file():
        raise CheckpointError(f"{ckpt_dir} is not a resumable checkpoint (no {STATE_FILE}); "
                              "give OUTPUT/checkpoints/step-N or the run's output_dir")
    meta = json.loads(meta_file.read_text())
    if _sharded(accelerator):
        fill_optimizer_state(optimizer)
        accelerator.load_state(str(ckpt_dir / "accelerate_state"))
        if (ckpt_dir / "scheduler.pt").is_file():
            scheduler.load_state_dict(torch.load(ckpt_dir / "scheduler.pt", weights_only=True))
    else:
        tensors = load_file(str(ckpt_dir / "trainable.safetensors"))
        params = dict(model.named_parameters())
        trainable = {n for n, p in params.items() if p.requires_grad}
        if set(tensors) != trainable:
            raise CheckpointError(f"{ckpt_dir} was written for other trainable parameters "
                                  f"({len(tensors)} saved, {len(trainable)} now); resume with the same config")
        with torch.no_grad():
            for n, t in tensors.items():
                params[n].copy_(t)
        optimizer.load_state_dict(torch.load(ckpt_dir / "optimizer.pt", map_location="cpu", weights_only=True))
        scheduler.load_state_dict(torch.load(ckpt_dir / "scheduler.pt", weights_only=True))
    rng_file = ckpt_dir / f"rng_{accelerator.process_index}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        logger.warning("no RNG state for process %d in %s; dropout draws will differ", accelerator.process_index,
                       ckpt_dir)
    return meta


def list_checkpoints(output_dir: Path) -> list[Path]:
    """``checkpoints/step-N`` folders of a run, oldest first."""
    root = Path(output_dir) / "checkpoints"
    found = []
    for p in root.glob("step-*"):
        m = re.fullmatch(r"step-(\d+)", p.name)
        if m and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def find_resume_dir(output_dir: Path, resume: str) -> Optional[Path]:
    """``resume`` = "latest" (newest checkpoint of ``output_dir``), a step-N folder or a run folder."""
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    p = Path(resume)
    if (p / STATE_FILE).is_file():
        return p
    found = list_checkpoints(p)
    if found:
        return found[-1]
    raise CheckpointError(f"--resume {resume}: no resumable checkpoint there (expected checkpoints/step-N with "
                          f"{STATE_FILE})")


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints."""
    found = list_checkpoints(output_dir)
    for p in found[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)
