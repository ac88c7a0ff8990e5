"""The fast decode path: a static KV cache, CUDA-graph (or ``torch.compile``) decode steps,
cache lengths bucketed so graphs are reused, and automatic fallback to the plain path.

``FastDecoder(model)`` plugs into the engine's decode loop (``run_decode``): ``prefill(...)``
returns the logits at the last prompt position and ``step(token)`` feeds one token and returns
the next logits, exactly like the engine's plain ``_forward`` with a ``DynamicCache``.

How it works:

- The KV cache is a transformers ``StaticCache`` of ``max_cache_len`` = the smallest *bucket*
  (256, 512, 1024, ...) that holds prompt + answer; one cache (and one captured graph) per
  (bucket, batch size) is kept, so prompts of any length reuse the same graphs.
- Attention masks are 4D additive masks built here from a per-row "valid" vector (which slots
  hold real tokens), so left-padded rows (batched decoding) and stale slots are handled without
  the data-dependent checks that break graph capture; transformers passes 4D masks through as-is.
- Modes: ``graph`` (CUDA graph of the decode step; the CUDA default), ``compile``
  (``torch.compile(mode="reduce-overhead")``), ``static`` (static cache, eager; the CPU default)
  and ``plain`` (``DynamicCache``, what the engine does without a fast path). A capture or compile
  failure, or a captured step whose logits differ from the eager step, falls back to ``static``
  with the reason logged and kept in ``fallback_reason``.
- Prefix reuse (follow-up questions) is the engine's: a session keeps its DynamicCache, the
  engine prefills only the new tokens and moves the cache in here with ``start_from``.
- Batched decoding is :meth:`Engine.answer_batch <medmvl_core.engine.engine.Engine.answer_batch>`:
  fresh requests are prefilled together into this decoder (``prefill``), others are prefilled
  together on the plain path (:mod:`medmvl_core.engine.batch`) and loaded here (``start_from``).
  The KV helpers (``stack_caches``, ``split_cache``, ``dynamic_from``) live in
  :mod:`medmvl_core.engine.kv`.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any, Callable, Sequence

import torch

from medmvl_core.engine.kv import dynamic_from, kv_layers as _kv_layers, split_cache, stack_caches  # noqa: F401 - re-exported
from medmvl_core.errors import MedMVLError

logger = logging.getLogger(__name__)

DEFAULT_BUCKETS: tuple[int, ...] = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
#: Token counts a follow-up's new tokens are padded to in :meth:`FastDecoder.extend` (one graph each).
CHUNKS: tuple[int, ...] = (8, 16, 32, 64, 128)
MODES = ("auto", "graph", "compile", "static", "plain")


class FastPathError(MedMVLError):
    """A request the fast decode path cannot serve (bad mode, too long for every bucket)."""


def select_mode(device_type: str, requested: str = "auto") -> tuple[str, str]:
    """The decode mode to use on ``device_type`` ("cuda", "cpu", "mps", ...) and why.

    Returns (mode, reason); mode is one of "graph", "compile", "static", "plain".
    """
    if requested not in MODES:
        raise FastPathError(f"fast-path mode {requested!r} is not known; use one of {list(MODES)}")
    if requested == "plain":
        return "plain", "plain path requested"
    if requested == "static":
        return "static", "static cache requested"
    if device_type != "cuda":
        why = (f"CUDA graphs / torch.compile need a CUDA device (this is {device_type}); "
               "using the static KV cache without graphs")
        return "static", why
    if requested == "auto":
        return "graph", "CUDA device: static KV cache with a CUDA-graph decode step"
    return requested, f"{requested} requested on CUDA"


def pick_bucket(length: int, buckets: Sequence[int] = DEFAULT_BUCKETS) -> int:
    """The smallest bucket >= ``length``; raises FastPathError when none is large enough."""
    for b in sorted(buckets):
        if b >= length:
            return int(b)
    raise FastPathError(f"a sequence of {length} tokens does not fit the largest KV-cache bucket "
                        f"({max(buckets)}); ask for fewer new tokens or a shorter conversation")


class _Slot:
    """One static cache with its valid-slot mask and decode buffers (one per bucket x batch)."""

    def __init__(self, llm: Any, cap: int, batch: int, device: torch.device, dtype: torch.dtype):
        from transformers import StaticCache

        self.cap, self.batch = cap, batch
        self.cache = StaticCache(config=llm.config, max_cache_len=cap)
        self.valid = torch.zeros(batch, cap, dtype=torch.bool, device=device)
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.cache_pos = torch.zeros(1, dtype=torch.long, device=device)
        self.pos_ids = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.runner: Callable[[], torch.Tensor] | None = None  # captured / compiled decode step
        self.chunks: dict[int, _Chunk] = {}  # extend(): buffers and runner per chunk length


class _Chunk:
    """Static inputs of one chunk length for :meth:`FastDecoder.extend` (graph-capturable)."""

    def __init__(self, batch: int, n: int, hidden: int, device: torch.device, dtype: torch.dtype):
        self.n = n
        self.embeds = torch.zeros(batch, n, hidden, dtype=dtype, device=device)
        self.pos_ids = torch.zeros(batch, n, dtype=torch.long, device=device)
        self.cache_pos = torch.zeros(n, dtype=torch.long, device=device)
        self.start = torch.zeros((), dtype=torch.long, device=device)   # first slot of the chunk
        self.last = torch.zeros(1, dtype=torch.long, device=device)     # index of the last real token
        self.runner: Callable[[], torch.Tensor] | None = None


class FastDecoder:
    """Static-KV-cache decoding with CUDA graphs where available (see module docstring).

    model: a MedMVLForConditionalGeneration (its ``.llm`` is used) or a transformers causal LM.
    mode: "auto" | "graph" | "compile" | "static" | "plain". buckets: allowed cache lengths.
    verify: compare the first replay of each captured graph with the eager step (fallback if not close).
    max_slots: how many (bucket, batch size) caches (+ graphs) are kept; the least recently used
    one beyond that is freed.
    """

    def __init__(self, model: Any, *, mode: str = "auto", buckets: Sequence[int] = DEFAULT_BUCKETS,
                 verify: bool = True, max_slots: int = 6):
        self.model = model
        self.llm = getattr(model, "llm", model)
        p = next(self.llm.parameters())
        self.device = p.device
        floats = [q.dtype for q in self.llm.parameters() if q.dtype.is_floating_point]
        self.dtype = floats[0] if floats else torch.float32
        self.mode, self.reason = select_mode(self.device.type, mode)
        if self.mode in ("graph", "compile") and _has_int8_layers(self.llm):
            self.mode = "static"
            self.reason = ("8-bit bitsandbytes layers synchronize with the host (outlier search), which "
                           "CUDA graphs cannot capture; using the static KV cache without graphs")
        self.fallback_reason: str | None = None
        self.buckets = tuple(sorted(int(b) for b in buckets))
        self.verify = verify
        self.max_slots = max(1, int(max_slots))
        self._slots: OrderedDict[tuple[int, int], _Slot] = OrderedDict()
        self._slot: _Slot | None = None
        self._w = 0                       # next write index in the static cache
        self._row_pos: torch.Tensor | None = None   # [B] next position id per row
        self._dyn: Any = None             # plain mode: DynamicCache
        self._plain_len = 0
        self._pool = None
        logger.info("fast decode path: %s (%s)", self.mode, self.reason)

    # ------------------------------------------------------------------ helpers
    @property
    def length(self) -> int:
        """Number of positions currently held in the cache (including left padding)."""
        return self._plain_len if self.mode == "plain" else self._w

    def _min(self) -> float:
        return torch.finfo(self.dtype).min

    def _get_slot(self, cap: int, batch: int) -> _Slot:
        key = (cap, batch)
        if key not in self._slots:
            spare = [k for k, v in self._slots.items() if v is not self._slot]  # oldest first
            while spare and len(self._slots) >= self.max_slots:
                del self._slots[spare.pop(0)]  # frees its cache tensors and graph
            self._slots[key] = _Slot(self.llm, cap, batch, self.device, self.dtype)
        self._slots.move_to_end(key)
        return self._slots[key]

    def _fallback(self, why: str) -> None:
        logger.warning("fast decode path: falling back from %s to the static cache: %s", self.mode, why)
        self.fallback_reason = why
        self.mode = "static"
        for s in self._slots.values():
            s.runner = None
            for c in s.chunks.values():
                c.runner = None

    @torch.inference_mode()
    def reset(self) -> None:
        """Forget the cached tokens (the cache tensors and graphs are kept for reuse)."""
        self._w, self._plain_len, self._dyn = 0, 0, None
        self._row_pos = None
        if self._slot is not None:
            self._slot.valid.zero_()

    # ------------------------------------------------------------------ prefill
    @torch.inference_mode()
    def prefill(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                max_new_tokens: int = 256) -> torch.Tensor:
        """Prefill ``inputs_embeds`` [B, L, hidden] (rows left-padded, ``attention_mask`` [B, L]
        with 0 at padding) into an empty cache.

        Returns the logits at the last position of each row, [B, vocab] (float).
        """
        b, n = inputs_embeds.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(b, n, dtype=torch.long, device=self.device)
        attention_mask = attention_mask.to(self.device)
        inputs_embeds = inputs_embeds.to(self.device, self.dtype)
        if self.mode == "plain":
            return self._prefill_plain(inputs_embeds, attention_mask)
        cap = pick_bucket(n + max_new_tokens, self.buckets)
        slot = self._slot = self._get_slot(cap, b)
        slot.valid.zero_()
        slot.valid[:, :n] = attention_mask.bool()
        # positions: count of real tokens before each slot in its row
        pos = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        cache_pos = torch.arange(n, device=self.device)
        cols = torch.arange(cap, device=self.device)[None, None, :]
        allowed = slot.valid[:, None, :] & (cols <= cache_pos[None, :, None])
        # a padding query attends to itself only, so its (unused) states stay finite
        allowed = allowed | (cols == cache_pos[None, :, None])
        mask = torch.zeros(b, 1, n, cap, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~allowed[:, None], self._min())
        out = self.llm(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=pos,
                       cache_position=cache_pos, past_key_values=slot.cache, use_cache=True,
                       logits_to_keep=1)
        self._w = n
        self._row_pos = attention_mask.long().sum(-1)  # next position id per row
        return out.logits[:, -1, :].float()

    def _copy_prefix(self, old: _Slot, new: _Slot, keep: int) -> None:
        for lo, ln in zip(old.cache.layers, new.cache.layers):
            if not getattr(lo, "is_initialized", False):
                continue
            if not getattr(ln, "is_initialized", False):
                ln.lazy_initialization(lo.keys[:, :, :1])
            ln.keys[:, :, :keep].copy_(lo.keys[:, :, :keep])
            ln.values[:, :, :keep].copy_(lo.values[:, :, :keep])
        new.valid[:, :keep] = old.valid[:, :keep]

    def _prefill_plain(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        from transformers import DynamicCache

        if embeds.shape[0] != 1:
            raise FastPathError("the plain path decodes one sequence at a time; use mode='static'")
        self._dyn = DynamicCache()
        total = embeds.shape[1]
        out = self.llm(inputs_embeds=embeds, attention_mask=torch.ones(1, total, dtype=torch.long,
                                                                       device=self.device),
                       past_key_values=self._dyn, use_cache=True, logits_to_keep=1)
        self._dyn, self._plain_len = out.past_key_values, total
        return out.logits[:, -1, :].float()

    # ------------------------------------------------------------------ decode
    @torch.inference_mode()
    def step(self, token: int | torch.Tensor) -> torch.Tensor:
        """Feed one token per row (an int, or LongTensor [B]); returns the next logits [B, vocab]."""
        tok = torch.as_tensor(token, dtype=torch.long, device=self.device).reshape(-1, 1)
        if self.mode == "plain":
            self._plain_len += 1
            out = self.llm(input_ids=tok, attention_mask=torch.ones(1, self._plain_len, dtype=torch.long,
                                                                    device=self.device),
                           past_key_values=self._dyn, use_cache=True)
            self._dyn = out.past_key_values
            return out.logits[:, -1, :].float()
        if self._slot is None:
            raise FastPathError("step() before prefill(): prefill the prompt first")
        if self._w >= self._slot.cap:
            self._grow()
        slot = self._slot
        slot.ids.copy_(tok.expand(slot.batch, 1))
        slot.cache_pos.fill_(self._w)
        slot.pos_ids.copy_(self._row_pos[:, None])
        slot.valid[:, self._w] = True
        logits = self._run_step(slot)
        self._w += 1
        self._row_pos = self._row_pos + 1
        return logits.float()

    @torch.inference_mode()
    def extend(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """Append ``inputs_embeds`` [1, n, hidden] (a follow-up question's new tokens) to the loaded
        cache in one forward — a captured graph per chunk length on CUDA — and return the logits
        at the last new token, [1, vocab] (float). Load the session's cache first (``start_from``).

        The tokens are right-padded to the next of :data:`CHUNKS`; the padding slots are written but
        stay invalid (never attended) and the next tokens overwrite them.
        """
        if self.mode == "plain":
            raise FastPathError("extend() needs the static cache; the plain path prefills through the engine")
        if self._slot is None:
            raise FastPathError("extend() before start_from()/prefill(): load a cache first")
        b, n = inputs_embeds.shape[:2]
        if b != 1 or self._slot.batch != 1:
            raise FastPathError("extend() takes one sequence (batch 1)")
        if n < 1:
            raise FastPathError("extend() needs at least one token")
        if n > max(CHUNKS):
            raise FastPathError(f"extend() takes at most {max(CHUNKS)} tokens at once, got {n}")
        chunk = pick_bucket(n, CHUNKS)
        while self._w + chunk > self._slot.cap:
            self._grow()
        slot, w = self._slot, self._w
        cb = slot.chunks.get(chunk)
        if cb is None:
            cb = slot.chunks[chunk] = _Chunk(1, chunk, inputs_embeds.shape[-1], self.device, self.dtype)
        cb.embeds.zero_()
        cb.embeds[:, :n].copy_(inputs_embeds.to(self.device, self.dtype))
        ar = torch.arange(chunk, device=self.device)
        cb.cache_pos.copy_(ar + w)
        cb.pos_ids.copy_(self._row_pos[:, None] + ar[None])
        cb.start.fill_(w)
        cb.last.fill_(n - 1)
        if self.mode in ("graph", "compile") and cb.runner is None:
            try:
                cb.runner = self._make_runner(lambda: self._eager_chunk(slot, cb), f"extend of {chunk}")
            except Exception as exc:  # noqa: BLE001 - any capture/compile failure falls back
                self._fallback(f"{self.mode} setup of extend failed: {type(exc).__name__}: {exc}")
        logits = cb.runner().clone() if self.mode in ("graph", "compile") and cb.runner else self._eager_chunk(slot, cb)
        slot.valid[:, w:w + n] = True
        slot.valid[:, w + n:w + chunk] = False
        self._w = w + n
        self._row_pos = self._row_pos + n
        return logits.float()

    def _eager_chunk(self, slot: _Slot, cb: _Chunk) -> torch.Tensor:
        """One forward of ``cb``'s tokens at slots ``start ..``: each attends to the valid slots before
        the chunk and, causally, to the chunk (reads/writes only static buffers)."""
        cols = torch.arange(slot.cap, device=self.device)
        before = slot.valid[:, None, :] & (cols < cb.start)[None, None, :]                 # [B, 1, cap]
        causal = (cols[None, :] >= cb.start) & (cols[None, :] <= cb.cache_pos[:, None])    # [n, cap]
        allowed = before | causal[None]                                                    # [B, n, cap]
        mask = torch.zeros(slot.batch, 1, cb.n, slot.cap, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~allowed[:, None], self._min())
        out = self.llm(inputs_embeds=cb.embeds, attention_mask=mask, position_ids=cb.pos_ids,
                       cache_position=cb.cache_pos, past_key_values=slot.cache, use_cache=True,
                       logits_to_keep=cb.last)
        return out.logits[:, -1, :]

    def _eager_step(self, slot: _Slot) -> torch.Tensor:
        mask = torch.zeros(slot.batch, 1, 1, slot.cap, dtype=self.dtype, device=self.device)
        mask.masked_fill_(~slot.valid[:, None, None, :], self._min())
        out = self.llm(input_ids=slot.ids, attention_mask=mask, position_ids=slot.pos_ids,
                       cache_position=slot.cache_pos, past_key_values=slot.cache, use_cache=True)
        return out.logits[:, -1, :]

    def _run_step(self, slot: _Slot) -> torch.Tensor:
        if self.mode in ("graph", "compile"):
            if slot.runner is None:
                try:
                    slot.runner = self._make_runner(lambda: self._eager_step(slot),
                                                    f"cache length {slot.cap}, batch {slot.batch}")
                except Exception as exc:  # noqa: BLE001 - any capture/compile failure falls back
                    self._fallback(f"{self.mode} setup failed: {type(exc).__name__}: {exc}")
            if slot.runner is not None:
                return slot.runner().clone()
        return self._eager_step(slot)

    def _make_runner(self, fn: Callable[[], torch.Tensor], what: str) -> Callable[[], torch.Tensor]:
        """Capture (graph) or compile (compile) ``fn``, an eager step over static buffers.

        ``fn`` is idempotent for its current inputs (it rewrites the same KV slots), so warming up
        and verifying with the real inputs is safe.
        """
        ref = fn().clone()
        if self.mode == "graph":
            runner = capture_cuda_graph(fn, self)
        else:
            runner = torch.compile(fn, mode="reduce-overhead", dynamic=False)
        got = runner()
        if self.verify:
            tol = 1e-3 if self.dtype == torch.float32 else 5e-2
            err = (got.float() - ref.float()).abs().max().item()
            scale = ref.float().abs().max().item() + 1e-6
            if not err <= tol * scale or int(got.argmax(-1)[0]) != int(ref.argmax(-1)[0]):
                raise FastPathError(f"the {self.mode} step ({what}) differs from the eager step "
                                    f"(max abs diff {err:.3g})")
        logger.info("fast decode path: %s ready for %s", self.mode, what)
        return runner

    def _grow(self) -> None:
        """Move to the next bucket when the answer outgrows the cache (copies the KV)."""
        old = self._slot
        cap = pick_bucket(old.cap + 1, self.buckets)
        new = self._get_slot(cap, old.batch)
        self._copy_prefix(old, new, self._w)
        new.valid[:, self._w:] = False
        self._slot = new

    def captured_step(self) -> Callable[[], torch.Tensor] | None:
        """The captured (graph) or compiled decode step of the current cache, replayable on its
        own (benchmarks time it without host work); None where the step runs eagerly."""
        slot = self._slot
        if self.mode not in ("graph", "compile") or slot is None:
            return None
        return slot.runner

    # ------------------------------------------------------------------ engine helpers
    @torch.inference_mode()
    def start_from(self, pasts: Any, lengths: int | Sequence[int], max_new_tokens: int = 256) -> None:
        """Continue decoding from prefilled DynamicCaches (the engine's session caches).

        pasts: one cache or a list (one per row), each holding at least ``lengths[i]`` positions
        of a single sequence; rows are left-padded into one static cache. Then call ``step``.
        """
        if not isinstance(pasts, (list, tuple)):
            pasts, lengths = [pasts], [int(lengths)]  # type: ignore[list-item]
        lengths = [int(n) for n in lengths]  # type: ignore[union-attr]
        if self.mode == "plain":
            if len(pasts) != 1:
                raise FastPathError("the plain path decodes one sequence at a time; use mode='static'")
            pasts[0].crop(lengths[0])
            self._dyn, self._plain_len = pasts[0], lengths[0]
            return
        b, lmax = len(pasts), max(lengths)
        slot = self._get_slot(pick_bucket(lmax + max_new_tokens, self.buckets), b)
        per_row = [_kv_layers(p) for p in pasts]
        for li, layer in enumerate(slot.cache.layers):
            if not getattr(layer, "is_initialized", False):
                k0 = per_row[0][li][0]
                layer.lazy_initialization(k0[:, :, :1].expand(b, -1, -1, -1))
            for r, n in enumerate(lengths):
                k, v = per_row[r][li]
                layer.keys[r, :, lmax - n:lmax].copy_(k[0, :, :n])
                layer.values[r, :, lmax - n:lmax].copy_(v[0, :, :n])
        slot.valid.zero_()
        for r, n in enumerate(lengths):
            slot.valid[r, lmax - n:lmax] = True
        self._slot, self._w = slot, lmax
        self._row_pos = torch.tensor(lengths, dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def to_dynamic(self, row: int = 0, length: int | None = None) -> Any:
        """Row ``row``'s first ``length`` real positions (default: all) as a DynamicCache."""
        if self.mode == "plain":
            if length is not None:
                self._dyn.crop(length)
            return self._dyn
        slot = self._slot
        start = int(slot.valid[row].nonzero()[0]) if slot.valid[row].any() else 0
        end = self._w if length is None else start + int(length)
        return dynamic_from([(layer.keys[row:row + 1, :, start:end].clone(),
                              layer.values[row:row + 1, :, start:end].clone())
                             for layer in slot.cache.layers])

    @torch.inference_mode()
    def warmup(self, prompt_len: int = 64, steps: int = 2, batch_sizes: Sequence[int] = (1,),
               buckets: Sequence[int] | None = None, max_new_tokens: int = 256) -> None:
        """Capture/compile the decode step for the given buckets and batch sizes (worker start).

        buckets: default, the bucket a ``prompt_len`` prompt with ``max_new_tokens`` answer uses.
        """
        if self.mode == "plain":
            return
        hidden = self.llm.get_input_embeddings().weight.shape[-1]
        for cap in buckets or [pick_bucket(prompt_len + max_new_tokens, self.buckets)]:
            for b in batch_sizes:
                n = max(1, min(prompt_len, cap - steps))
                x = torch.zeros(b, n, hidden, dtype=self.dtype, device=self.device)
                self.prefill(x, max_new_tokens=cap - n)
                for _ in range(steps):
                    self.step(torch.zeros(b, dtype=torch.long))
        self.reset()


def capture_cuda_graph(fn: Callable[[], torch.Tensor], owner: FastDecoder) -> Callable[[], torch.Tensor]:
    """Capture ``fn`` (reads/writes only static buffers) into a CUDA graph; returns ``replay``."""
    if not torch.cuda.is_available():
        raise FastPathError("CUDA graphs need a CUDA device")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up (cuBLAS workspaces, lazy inits) off the capture
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    if owner._pool is None:
        owner._pool = torch.cuda.graph_pool_handle()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=owner._pool):
        out = fn()

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay


def llm_config(model: Any) -> Any:
    """The language model's config (what a StaticCache is shaped from)."""
    llm = getattr(model, "llm", None)
    if llm is not None and hasattr(llm, "config"):
        return llm.config
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _has_int8_layers(module: torch.nn.Module) -> bool:
    return any(type(m).__name__ == "Linear8bitLt" for m in module.modules())
