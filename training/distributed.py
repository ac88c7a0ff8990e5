"""What accelerate needs to run FSDP and DeepSpeed ZeRO on CPU processes (gloo), and the checks
that a launch runs the engine it asked for.

accelerate (1.16) switches its FSDP and DeepSpeed plugins on only for GPU-class devices: with
``Accelerator(cpu=True)`` (no GPU) an FSDP or DeepSpeed launch silently becomes plain data
parallel (``MULTI_CPU``). On CPU, FSDP itself works (torch's FSDP2 ``fully_shard`` with gloo), so
:func:`enable_requested_engine` turns the FSDP plugin accelerate built from the launch
environment back on; DeepSpeed has a CPU accelerator of its own, started the same way. A launch
whose engine cannot be enabled raises instead of training with another one.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Iterator

from medmvl_core.errors import ConfigError, MedMVLError

logger = logging.getLogger(__name__)


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() == "true"


def requested_engine() -> str:
    """``fsdp`` / ``deepspeed`` / ``ddp`` from the environment ``accelerate launch`` sets."""
    if _flag("ACCELERATE_USE_FSDP"):
        return "fsdp"
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    return "ddp"




def enable_requested_engine(acc: Any) -> str:
    """Make ``acc`` run the engine the launch asked for; returns its name. Call right after creating
    the Accelerator, before ``prepare``."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    want = requested_engine()
    have = acc.distributed_type
    if want == "fsdp" and have != DistributedType.FSDP:
        if have != DistributedType.MULTI_CPU:
            raise ConfigError(f"the launch asked for FSDP but accelerate runs {have}; check the accelerate config "
                              "(distributed_type: FSDP, num_processes > 1)")
        plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables the launcher set
        state = AcceleratorState()
        state.fsdp_plugin = plugin
        state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        logger.info("FSDP (version %s) on CPU processes (gloo)", plugin.fsdp_version)
    elif want == "deepspeed" and have != DistributedType.DEEPSPEED:
        if have != DistributedType.MULTI_CPU:
            raise ConfigError(f"the launch asked for DeepSpeed but accelerate runs {have}; check the accelerate "
                              "config (distributed_type: DEEPSPEED, num_processes > 1)")
        try:
            import deepspeed
        except ImportError as exc:
            raise ConfigError("the launch asked for DeepSpeed, which is not installed: pip install "
                              "'medmvl-slicer[deepspeed]' (or pip install deepspeed)") from exc
        from accelerate.utils import DeepSpeedPlugin

        plugin = DeepSpeedPlugin()  # reads the ACCELERATE_DEEPSPEED_* variables the launcher set
        plugin.set_mixed_precision(acc.mixed_precision)
        state = AcceleratorState()
        state.deepspeed_plugins = plugin
        state.distributed_type = DistributedType.DEEPSPEED
        PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED
        plugin.select(_from_accelerator_state=True)
        acc.deepspeed_engine_wrapped = None
        # DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu) talks over the gloo group accelerate opened
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
        logger.info("DeepSpeed ZeRO-%s on CPU processes (gloo)", plugin.zero_stage)
    return want


def fit_fsdp_wrap_classes(acc: Any, model: Any) -> None:
    """Keep only the FSDP wrap classes the model has: one accelerate config lists the decoder layers
    of every supported LLM (Qwen2, Llama, Phi-3) and the vision towers, and accelerate refuses a
    class the model lacks ("Could not find the transformer layer class ...")."""
    from accelerate.utils import DistributedType

    if acc.distributed_type != DistributedType.FSDP:
        return
    plugin = acc.state.fsdp_plugin
    names = plugin.transformer_cls_names_to_wrap
    if not names:
        return
    present = {type(m).__name__ for m in model.modules()}
    keep = [n for n in names if n in present]
    if not keep:
        raise ConfigError(f"FSDP: none of the wrap classes {names} is in this model; set "
                          f"fsdp_transformer_layer_cls_to_wrap to its layer class(es), e.g. "
                          f"{sorted(n for n in present if n.endswith('Layer'))[:4]}")
    if keep != list(names):
        logger.info("FSDP wraps %s (not in this model: %s)", keep, [n for n in names if n not in keep])
    plugin.transformer_cls_names_to_wrap = keep


@contextlib.contextmanager
def whole_model_init() -> Iterator[None]:
    """Build (or load) models whole on every process while DeepSpeed ZeRO-3 is configured.

    accelerate's DeepSpeed plugin registers its config with transformers whatever
    ``zero3_init_flag`` says, and transformers then creates every model inside
    ``deepspeed.zero.Init``: parameters partitioned at construction (empty on each rank), so
    loading a checkpoint into them fails ("size mismatch ... torch.Size([0])") and a from-scratch
    model gets another random init than one process would. Our recipe builds the model whole and
    lets ``accelerator.prepare`` partition it (what ``zero3_init_flag: false`` asks for).
    """
    try:
        from transformers.integrations import deepspeed as hf_ds
    except ImportError:  # pragma: no cover - transformers is a dependency
        yield
        return
    saved = getattr(hf_ds, "_hf_deepspeed_config_weak_ref", None)
    hf_ds._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_ds._hf_deepspeed_config_weak_ref = saved


class PeerLostError(MedMVLError):
    """Another process of a multi-process run stopped; this one stops too (resume from a checkpoint)."""


_PEER_SIGNS = ("connection closed", "connection reset", "broken pipe", "timed out", "timeout", "gloo", "nccl",
               "processgroup", "socket", "peer")


def is_peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because another process died or hung."""
    import torch

    if isinstance(exc, getattr(torch.distributed, "DistError", ())):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(s in text for s in _PEER_SIGNS)


def peer_lost(exc: BaseException, rank: int, world: int, step: int, last_checkpoint: Any) -> PeerLostError:
    """The error a surviving process raises: what happened, where the run stands, what to do."""
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    where = f"The last checkpoint is {last_checkpoint}" if last_checkpoint else "No checkpoint was written yet"
    return PeerLostError(f"process {rank} of {world}: another process of this run stopped or stopped answering "
                         f"during step {step + 1} ({first}); this process stops too. {where}; run the same launch "
                         "command with --resume to continue")
