"""Load safetensors weights tensor by tensor, so a model is never held twice in memory.

A released 3B checkpoint is 6.4 GB of bf16; loading it the simple way (read every shard into a
state dict, build the model, then ``.to(float32)``) holds the bf16 copy and the float32 copy at
once: 19 GB at the peak, 1.5x the float32 weights. Here the model is built without initialising
its weights (untouched pages cost no memory), and each tensor is read from its shard with plain
file reads (no mmap, so the file's pages are never counted as this process's memory), converted
to the load dtype and assigned into the model (``load_state_dict(assign=True)``) before the next
one is read: the peak is the loaded model plus one tensor. With ``quantize="int8"`` each LLM
linear layer is quantized (torch dynamic int8) as soon as its weights are in, and its float
weights are dropped, so int8 loading never holds the float32 model either.
"""

from __future__ import annotations

import json
import logging
import struct
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from medmvl_core.errors import CheckpointError

logger = logging.getLogger(__name__)

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def shard_files(folder: Path) -> list[Path]:
    """The folder's safetensors files: ``model.safetensors`` or the shards of the index."""
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise CheckpointError(f"shard(s) {missing} listed in {index} are missing; re-download the checkpoint")
        return [folder / n for n in names]
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
        raise CheckpointError(
            f"{folder} has only pickle weights (*.bin/*.pt); this project loads safetensors only. "
            "Convert them with transformers' save_pretrained(safe_serialization=True) on a trusted machine")
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {folder}")


CHUNK_BYTES = 64 << 20  # big tensors are converted through a buffer of this size


def _read_into(fh, buf: torch.Tensor, what: str) -> None:
    """Fill the uint8 tensor ``buf`` from ``fh`` (one read() returns at most ~2 GB on Linux)."""
    view, got = memoryview(buf.numpy()), 0
    while got < len(view):
        n_read = fh.readinto(view[got:])
        if not n_read:
            raise CheckpointError(f"{what}: the file is truncated; re-download the checkpoint")
        got += n_read


def _read_converted(fh, nbytes: int, st: torch.dtype, shape: list, dtype: torch.dtype, what: str) -> torch.Tensor:
    """Read a big stored tensor straight into a new ``dtype`` tensor, chunk by chunk, so the
    stored copy never exists whole next to the converted one."""
    out = torch.empty(shape, dtype=dtype)
    flat, item = out.view(-1), torch.empty(0, dtype=st).element_size()
    step = CHUNK_BYTES - CHUNK_BYTES % item
    buf = torch.empty(step, dtype=torch.uint8)
    done = 0
    while done < nbytes:
        n = min(step, nbytes - done)
        _read_into(fh, buf[:n], what)
        flat[done // item:(done + n) // item].copy_(buf[:n].view(st))
        done += n
    return out


def iter_tensors(path: Path, dtype: torch.dtype | Callable[[str], torch.dtype | None] | None = None
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of one safetensors file, in file order, each read into
    its own buffer and converted to ``dtype`` (floating tensors only; a callable gives the dtype
    per tensor name)."""
    with open(path, "rb", buffering=0) as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
        base = 8 + n
        entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                         key=lambda kv: kv[1]["data_offsets"][0])
        for name, meta in entries:
            st = _ST_DTYPES.get(meta["dtype"])
            if st is None:
                raise CheckpointError(f"{path.name}: tensor {name} has dtype {meta['dtype']}, which is not supported")
            start, end = meta["data_offsets"]
            fh.seek(base + start)
            shape = meta["shape"]
            want = dtype(name) if callable(dtype) else dtype
            convert = want is not None and st.is_floating_point and st != want
            if convert and end - start > CHUNK_BYTES:
                t = _read_converted(fh, end - start, st, shape, want, f"{path.name}: {name}")
            else:
                buf = torch.empty(end - start, dtype=torch.uint8)
                _read_into(fh, buf, f"{path.name}: {name}")
                t = buf.view(st).reshape(shape) if end > start else torch.empty(shape, dtype=st)
                del buf  # t holds the storage
                if convert:
                    t = t.to(want)
            yield name, t
            del t


def _assign(model: nn.Module, name: str, t: torch.Tensor) -> None:
    """``load_state_dict({name: t}, assign=True)`` for one tensor, without walking the model."""
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if attr in mod._parameters:
        old = mod._parameters[attr]
        if old is not None and tuple(old.shape) != tuple(t.shape):
            raise CheckpointError(f"tensor {name} has shape {tuple(t.shape)} in the checkpoint but "
                                  f"{tuple(old.shape)} in the model built from its config")
        mod._parameters[attr] = nn.Parameter(t, requires_grad=False)
    else:
        mod._buffers[attr] = t


def stream_into(model: nn.Module, files: list[Path], dtype: torch.dtype | Callable[[str], torch.dtype],
                skip_prefixes: tuple[str, ...] = (), quantize: str = "none", optional: tuple[str, ...] = ()) -> None:
    """Assign every tensor of ``files`` into ``model`` (converted to ``dtype``, or to ``dtype(name)``); raises
    ``CheckpointError`` naming missing and unexpected tensors. ``optional``: model keys the
    files may lack (a tied head). ``quantize="int8"``: LLM linear layers quantized as they fill."""
    from medmvl_core.engine.quantize import Int8Filler

    expected = set(model.state_dict().keys())
    filler = Int8Filler(model) if quantize == "int8" else None
    seen, unexpected, skipped = set(), [], 0
    for f in files:
        for name, t in iter_tensors(f, dtype):
            if name.startswith(skip_prefixes):
                skipped += 1
                continue
            if name not in expected:
                unexpected.append(name)
                continue
            if filler is not None and filler.take(name, t):
                seen.add(name)
                continue
            _assign(model, name, t)
            seen.add(name)
    missing = sorted(expected - seen - set(optional))
    if skipped:
        logger.info("ignored %d weights of the 3D CLIP text tower", skipped)
    if missing or unexpected:
        raise CheckpointError(
            f"the weights do not match the config: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}; "
            "the base-model configs (presets or local folders) must be the ones the checkpoint was trained with")
