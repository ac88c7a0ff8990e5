"""The inference engine: caches, per-session KV caches, streaming greedy/sampled decoding.

One engine wraps one model + processor (the same processor as training, so prompts are
byte-identical to MedM-VL's). It is driven by one thread at a time (the worker's GPU thread);
sessions and caches are safe to inspect from others.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from medmvl_core.engine import tasks as T
from medmvl_core.engine.cache import LRUCache
from medmvl_core.engine.decode import SamplingParams, TextStreamer, choose_token, run_decode
from medmvl_core.engine.fast_decode import llm_config, split_cache, stack_caches
from medmvl_core.engine.errors import (CancelledError, EngineOutOfMemoryError, NotFoundError,
                                       RequestError, RequestTimeoutError, SessionBusyError)
from medmvl_core.engine.hashing import volume_hash
from medmvl_core.engine.session import Session, cache_nbytes

logger = logging.getLogger(__name__)

IMAGE_TOKEN_INDEX, IMAGE3D_TOKEN_INDEX = -200, -201
_PLACEHOLDER_ID = {"image": IMAGE_TOKEN_INDEX, "image3d": IMAGE3D_TOKEN_INDEX}


@dataclass
class Answer:
    """text; boxes ``[{"model", "voxel", "physical_lps"}]``; timings in seconds and counts."""

    text: str
    boxes: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "stop"
    question: str = ""
    task: str = "ask"


@dataclass
class ImageEntry:
    """A preprocessed image (tensor [C, (D,) H, W]) with its geometry record and encoder output."""

    key: tuple
    tensor: torch.Tensor
    geom: Any
    embeds: torch.Tensor | None = None
    boxes: torch.Tensor | None = None  # [K, 6]: what the model's box reference tokens stand for (box_refs)


def _tensor_bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def is_oom(exc: BaseException) -> bool:
    """True for CUDA out-of-memory errors (and RuntimeErrors that say so, e.g. from other backends)."""
    oom_cls = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    if oom_cls is not None and isinstance(exc, oom_cls):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def input_kind(volume: Any) -> str:
    """``"image"`` for a 2D image ([1, H, W], [1, H, W, 3] or [H, W]), else ``"image3d"``."""
    shape = tuple(np.shape(volume.array))
    if len(shape) == 2 or len(shape) == 4 or (len(shape) == 3 and shape[0] == 1):
        return "image"
    return "image3d"


def supported_kinds(model: Any) -> tuple[str, ...]:
    """The placeholder kinds the model can take (``num_image_tokens`` does not raise)."""
    out = []
    for kind in ("image", "image3d"):
        try:
            if int(model.num_image_tokens(kind)) > 0:
                out.append(kind)
        except Exception:  # noqa: BLE001 - no path for this kind
            pass
    return tuple(out)


class Engine:
    """Answers questions about images with caching.

    cache_bytes: budget of the preprocessed-tensor + encoder-output cache (LRU).
    kv_cache_bytes: budget of all sessions' KV caches together (LRU over sessions; an evicted
    session keeps its history and re-prefills on its next turn).
    use_cache=False gives the reference path (re-preprocess, re-encode, re-prefill every turn).
    fault_hook(stage) is called at "preprocess", "encode", "prefill" and every "decode" step
    (tests inject failures and delays through it).
    decode_mode: "plain" (DynamicCache, every device), "static" (the static-KV-cache
    :class:`~medmvl_core.engine.fast_decode.FastDecoder`, eager) or "auto" (FastDecoder in its
    own "auto" mode — CUDA graphs — on CUDA, plain elsewhere); compile_decode=True asks the
    FastDecoder for torch.compile instead. Session caches move in and out of its static cache
    (``start_from`` / ``to_dynamic``); any failure falls back to the plain path.
    """

    def __init__(self, model: Any, processor: Any, *,
                 cache_bytes: int = 2 << 30, kv_cache_bytes: int = 4 << 30,
                 use_cache: bool = True, max_new_tokens_limit: int = 2048,
                 fault_hook: Callable[[str], None] | None = None, decode_mode: str = "auto",
                 compile_decode: bool = False):
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", None)
        self.kinds = supported_kinds(model)
        params = list(model.parameters())
        self.device = params[0].device if params else torch.device("cpu")
        floats = [p.dtype for p in params if p.dtype.is_floating_point]
        self.dtype = floats[0] if floats else torch.float32
        self.use_cache = use_cache
        if decode_mode not in ("auto", "plain", "static"):
            raise RequestError(f"decode_mode must be auto, plain or static, got {decode_mode!r}")
        self.decode_mode = decode_mode
        self.compile_decode = compile_decode
        self._static_ok = True
        self._fast: Any = None
        self._fast_lock = threading.Lock()
        self.context_limit = int(getattr(llm_config(model), "max_position_embeddings", 0) or 0)
        self.max_new_tokens_limit = max_new_tokens_limit
        self.fault_hook = fault_hook
        self.images: LRUCache[ImageEntry] = LRUCache(
            cache_bytes, lambda e: _tensor_bytes(e.tensor) + _tensor_bytes(e.embeds))
        self.kv_cache_bytes = kv_cache_bytes
        self.sessions: dict[str, Session] = {}
        self._kv_lru: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()
        eos = getattr(self.tokenizer, "eos_token_id", None)
        self.eos_ids = {int(eos)} if eos is not None else set()

    def kind_for(self, volume: Any) -> str:
        """Which placeholder a volume takes; raises when the model has no path for it."""
        kind = input_kind(volume)
        if kind not in self.kinds:
            what = "2D images" if kind == "image" else "3D volumes"
            raise RequestError(f"this model does not take {what} (it takes "
                               f"{', '.join(self.kinds) or 'nothing'})", code="wrong_input_kind")
        return kind

    # ------------------------------------------------------------------ images
    def _hook(self, stage: str) -> None:
        if self.fault_hook is not None:
            self.fault_hook(stage)

    def prepare(self, volume: Any, roi: Sequence[float] | None = None,
                timings: dict | None = None, vhash: str | None = None) -> ImageEntry:
        """Preprocess + encode ``volume`` (optionally cropped to a voxel ``roi``), with caching."""
        timings = timings if timings is not None else {}
        kind = self.kind_for(volume)
        key = (vhash or volume_hash(volume), tuple(float(v) for v in roi) if roi else None)
        entry = self.images.get(key) if self.use_cache else None
        t0 = time.perf_counter()
        if entry is None:
            self._hook("preprocess")
            try:
                if kind == "image3d":
                    arr, geom = self.processor.preprocess_volume(volume, roi=roi)
                elif roi is not None:
                    arr, geom = self.processor.preprocess_image(volume, roi=roi)
                else:
                    arr, geom = self.processor.preprocess_image(volume)
            except TypeError as exc:
                raise RequestError(f"this model cannot crop its input to a box: {exc}") from exc
            tensor = torch.as_tensor(np.asarray(arr)).to(self.device, self.dtype)
            entry = ImageEntry(key, tensor, geom)
        timings["preprocess_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        if entry.embeds is None:
            self._hook("encode")
            with torch.inference_mode():
                if kind == "image3d":
                    embeds = self.model.encode_images(images3d=entry.tensor[None])
                else:
                    embeds = self.model.encode_images(images=entry.tensor[None])
                if getattr(self.model.config, "box_refs", None) and kind == getattr(self.model, "box_ref_kind", None):
                    entry.boxes = self.model.find_boxes(entry.tensor[None])[0].float().cpu()
            entry.embeds = embeds
            if self.use_cache:
                self.images.put(key, entry)
        timings["encode_s"] = time.perf_counter() - t0
        return entry

    # ------------------------------------------------------------------ sessions
    def create_session(self, volume: Any, volume_id: str | None = None,
                       session_id: str | None = None) -> Session:
        """Open a conversation about ``volume``; returns the session (id in ``.id``)."""
        s = Session(volume=volume, volume_id=volume_id or volume_hash(volume))
        if session_id:
            s.id = session_id
        with self._lock:
            self.sessions[s.id] = s
        return s

    def evict_idle_sessions(self, keep: int) -> int:
        """Delete least-recently-used idle sessions until at most ``keep`` remain; returns how many."""
        removed = 0
        with self._lock:
            idle = sorted((s for s in self.sessions.values() if not s.lock.locked()),
                          key=lambda s: s.last_used)
            while len(self.sessions) > keep and idle:
                victim = idle.pop(0)
                self.sessions.pop(victim.id, None)
                self._kv_lru.pop(victim.id, None)
                victim.drop_kv()
                removed += 1
        return removed

    def warmup(self, max_new_tokens: int = 4, batch_sizes: Sequence[int] = (1,)) -> float:
        """Run a throw-away question and follow-up per input kind (compiles/captures the static
        decode step and the follow-up prefill, fills allocator pools) and forget them; returns the
        seconds it took."""
        t0 = time.perf_counter()
        try:
            from medmvl_core.imaging import Volume
        except ImportError:
            from medmvl_core.engine.testing import ToyVolume as Volume  # type: ignore[assignment]
        shapes = {"image3d": (32, 64, 64), "image": (1, 64, 64)}
        for kind in self.kinds:
            s = self.create_session(Volume(np.zeros(shapes[kind], dtype=np.int16)))
            try:
                self.answer(question="Warm-up.", session=s, max_new_tokens=max_new_tokens)
                self.answer(question="And a follow-up question?", session=s, max_new_tokens=max_new_tokens)
            finally:
                self.delete_session(s.id)
                self.images.clear()
        if self._fast is not None and self._static_ok:
            try:  # capture the batched decode steps too
                self._fast.warmup(batch_sizes=batch_sizes)
            except Exception as exc:  # noqa: BLE001 - warm-up is an optimisation only
                logger.warning("fast-path warm-up failed: %s", exc)
        return time.perf_counter() - t0

    def get_session(self, session_id: str) -> Session:
        s = self.sessions.get(session_id)
        if s is None:
            raise NotFoundError(f"unknown session {session_id!r}: create one with POST /v1/sessions",
                                code="unknown_session")
        return s

    def delete_session(self, session_id: str) -> None:
        with self._lock:
            s = self.sessions.pop(session_id, None)
            self._kv_lru.pop(session_id, None)
        if s is None:
            raise NotFoundError(f"unknown session {session_id!r}", code="unknown_session")
        s.drop_kv()

    def kv_bytes_used(self) -> int:
        return sum(self._kv_lru.values())

    def _account_kv(self, s: Session) -> None:
        s.kv_bytes = cache_nbytes(s.past)
        with self._lock:
            self._kv_lru.pop(s.id, None)
            if s.past is None:
                return
            self._kv_lru[s.id] = s.kv_bytes
            while sum(self._kv_lru.values()) > self.kv_cache_bytes and len(self._kv_lru) > 0:
                victim_id, _ = self._kv_lru.popitem(last=False)
                victim = self.sessions.get(victim_id)
                if victim is not None:
                    victim.drop_kv()
                    logger.info("KV cache of session %s evicted (budget %d bytes)",
                                victim_id[:8], self.kv_cache_bytes)

    # ------------------------------------------------------------------ prompts
    def conversation(self, turns: Sequence[tuple[str, str]], question: str,
                     kind: str = "image3d") -> list[dict]:
        """MedM-VL conversation JSON: placeholder + newline + first question, then the turns."""
        ph = T.PLACEHOLDERS[kind]
        conv: list[dict] = []
        for i, (q, a) in enumerate(turns):
            conv.append({"from": "human", "value": f"{ph}\n{q}" if i == 0 else q})
            conv.append({"from": "gpt", "value": a})
        conv.append({"from": "human", "value": f"{ph}\n{question}" if not turns else question})
        return conv

    def encode_prompt(self, conversation: list[dict], kind: str = "image3d") -> list[int]:
        """Generation-prompt ids with the placeholder expanded to the model's image-token count."""
        ids = [int(t) for t in self.processor.encode(conversation, mode="generate")["input_ids"]]
        pid = _PLACEHOLDER_ID[kind]
        n = int(self.model.num_image_tokens(kind))
        if ids.count(pid) == 1 and n > 1:
            at = ids.index(pid)
            ids = ids[:at] + [pid] * n + ids[at + 1:]
        return ids

    # ------------------------------------------------------------------ model calls
    def _forward(self, ids: list[int], total_len: int, past: Any,
                 image_embeds: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        mask = torch.ones(1, total_len, dtype=torch.long, device=self.device)
        kwargs: dict[str, Any] = {"input_ids": x, "attention_mask": mask,
                                  "past_key_values": past, "use_cache": True}
        if image_embeds is not None:
            kwargs["image_embeds"] = image_embeds
        with torch.inference_mode():
            out = self.model(**kwargs)
        return out.logits[:, -1, :], out.past_key_values

    # ------------------------------------------------------------------ answer
    def answer(self, volume_or_image: Any = None, question: str | None = None, task: str = "ask",
               box: Sequence[float] | None = None, max_new_tokens: int = 256,
               do_sample: bool = False, on_token: Callable[[str], None] | None = None,
               cancel: Any = None, *, session: Session | None = None,
               temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
               seed: int | None = None, deadline: float | None = None) -> Answer:
        """Answer one question and, with a ``session``, extend its conversation.

        box: voxel box (k1, j1, i1, k2, j2, i2) (2D: (j1, i1, j2, i2)), inclusive-exclusive,
        for "describe" and "crop_ask". on_token(piece) streams text. cancel: an Event-like
        (``is_set()``) or a callable returning True; checked before every decode step.
        deadline: ``time.monotonic()`` value after which the request fails with a timeout.
        """
        req = Request(volume_or_image, question, task, box, max_new_tokens, do_sample, on_token,
                      cancel, session, temperature, top_p, top_k, seed, deadline)
        s = self._session_for(req)
        if not s.lock.acquire(blocking=False):
            raise SessionBusyError(f"session {s.id[:8]} is already answering; wait or cancel")
        try:
            with self._oom_guard(s):
                p = self._prepare_request(s, req)
                try:
                    logits = self._prefill(p, extend=True)
                    tokens, reason, fed = self._decode_one(p, logits)
                finally:
                    if p.fast is not None:  # loaded by the prefill but the decode never took it
                        p.fast = None
                        self._fast_lock.release()
                return self._finish(p, tokens, reason, fed)
        finally:
            s.last_used = time.monotonic()
            s.lock.release()

    def answer_batch(self, requests: Sequence["Request"]) -> list[Answer | BaseException]:
        """Answer several questions (different sessions) sharing their decode steps.

        Each request is prepared and prefilled on its own (its session cache reused), then one
        batched forward per step decodes all of them (left-padded caches). Results are in
        order: an :class:`Answer` or the exception that request failed with. Greedy tokens
        equal answering them one by one.
        """
        results: list[Answer | BaseException | None] = [None] * len(requests)
        live: list[tuple[int, _Prepared, torch.Tensor]] = []
        prepared: list[tuple[int, _Prepared]] = []
        locked: list[Session] = []
        try:
            for i, req in enumerate(requests):
                try:
                    s = self._session_for(req)
                    if not s.lock.acquire(blocking=False):
                        raise SessionBusyError(f"session {s.id[:8]} is already answering")
                    locked.append(s)
                    with self._oom_guard(s):
                        prepared.append((i, self._prepare_request(s, req)))
                except BaseException as exc:  # noqa: BLE001 - reported per request
                    results[i] = exc
            if len(prepared) > 1 and all(p.past is None for _, p in prepared):
                done = self._answer_fresh_batch(prepared)  # one prefill for all; None: not possible
                if done is not None:
                    for i, res in done:
                        results[i] = res
                    prepared = []
            for i, p in prepared:
                try:
                    with self._oom_guard(p.session):
                        live.append((i, p, self._prefill(p)))
                except BaseException as exc:  # noqa: BLE001 - reported per request
                    results[i] = exc
            if len(live) == 1:
                i, p, logits = live[0]
                try:
                    with self._oom_guard(p.session):
                        results[i] = self._finish(p, *self._decode_one(p, logits))
                except BaseException as exc:  # noqa: BLE001
                    results[i] = exc
            elif live:
                for i, res in zip([i for i, _, _ in live], self._decode_many(live)):
                    results[i] = res
        finally:
            for s in locked:
                s.last_used = time.monotonic()
                s.lock.release()
        return results  # type: ignore[return-value]

    def _answer_fresh_batch(self, prepared: list[tuple[int, "_Prepared"]]
                            ) -> list[tuple[int, Answer | BaseException]] | None:
        """Requests with no cached prefix: one left-padded prefill for all of them in the
        FastDecoder's static cache, then the batched decode from there (no cache copies). None when
        the fast path is not in use or busy, or the prefill fails (the caller prefills them one by
        one)."""
        if not (self._use_static() and self._static_ok) or not self._fast_lock.acquire(blocking=False):
            return None
        preps = [p for _, p in prepared]
        try:
            for p in preps:
                self._hook("prefill")
            t0 = time.perf_counter()
            with torch.inference_mode():
                rows = [self.model.embed_inputs(torch.tensor([p.ids], dtype=torch.long, device=self.device),
                                                p.entry.embeds if any(t < 0 for t in p.ids) else None)
                        for p in preps]
                lengths = [len(p.ids) for p in preps]
                lmax = max(lengths)
                embeds = torch.zeros(len(rows), lmax, rows[0].shape[-1], dtype=rows[0].dtype, device=self.device)
                mask = torch.zeros(len(rows), lmax, dtype=torch.long, device=self.device)
                for b, (r, n) in enumerate(zip(rows, lengths)):
                    embeds[b, lmax - n:] = r[0]
                    mask[b, lmax - n:] = 1
                fast = self._fast_decoder()
                logits = fast.prefill(embeds, mask, max_new_tokens=max(p.params.max_new_tokens for p in preps))
        except Exception as exc:  # noqa: BLE001 - prefill them one by one instead
            self._fast_lock.release()
            if is_oom(exc) and self.device.type == "cuda":
                torch.cuda.empty_cache()
            logger.warning("batched prefill failed (%s); prefilling the requests one by one", exc)
            return None
        dt = time.perf_counter() - t0
        for p in preps:
            p.timings.update(prefill_s=dt, prefill_tokens=len(p.ids), cached_tokens=0,
                             prefill_path=f"batch{len(preps)}:static:{fast.mode}")
            p.t_decode = time.perf_counter()
        try:
            with torch.inference_mode():
                outs = self._batched_loop(preps, logits.to(self.dtype), lengths, lmax, len(preps), fast)
        except BaseException as exc:  # noqa: BLE001
            if not is_oom(exc):
                outs = [exc] * len(preps)  # every row fails alike (a broken step)
            else:  # start them again one by one; text already streamed is not sent again
                logger.warning("out of memory in a batched decode; answering the requests one by one")
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                for p in preps:
                    p.streamer.ids = []
                    p.timings.pop("prefill_path", None)
                return None
        finally:
            self._fast_lock.release()
        results: list[tuple[int, Answer | BaseException]] = []
        for (i, p), out in zip(prepared, outs):
            if isinstance(out, BaseException):
                p.session.drop_kv()
                results.append((i, out))
            else:
                results.append((i, self._finish(p, *out)))
        return results

    def _session_for(self, req: "Request") -> Session:
        if req.session is not None:
            return req.session
        if req.volume is None:
            raise RequestError("answer() needs an image or a session")
        return Session(volume=req.volume, volume_id=volume_hash(req.volume))

    @contextmanager
    def _oom_guard(self, s: Session):
        try:
            yield
        except BaseException as exc:
            if is_oom(exc):
                s.drop_kv()
                self.images.clear()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                raise EngineOutOfMemoryError(
                    "the device ran out of memory for this request; ask a shorter question, "
                    "use a smaller max_new_tokens, or start the worker with --quantize 8bit/4bit"
                ) from exc
            if not isinstance(exc, (CancelledError, RequestTimeoutError, RequestError)):
                s.drop_kv()  # the cache may be half-written
            raise

    def _check_factory(self, cancel: Any, deadline: float | None) -> Callable[[], None]:
        def check() -> None:
            if cancel is not None and (cancel.is_set() if hasattr(cancel, "is_set") else cancel()):
                raise CancelledError("the answer was cancelled")
            if deadline is not None and time.monotonic() > deadline:
                raise RequestTimeoutError("the answer took longer than the request's time limit; "
                                          "ask for fewer tokens or raise timeout_s")
        return check

    def _prepare_request(self, s: Session, req: "Request") -> "_Prepared":
        """Validate, preprocess/encode (cached), build the prompt ids, pick the reusable prefix."""
        params = SamplingParams(req.max_new_tokens, req.do_sample, req.temperature, req.top_p,
                                req.top_k, req.seed)
        params.validate(self.max_new_tokens_limit)
        task, box = req.task, req.box
        if task not in T.TASKS:
            raise RequestError(f"unknown task {task!r}; use one of {', '.join(T.TASKS)}",
                               code="bad_task")
        t_start = time.perf_counter()
        timings: dict[str, float] = {}
        check = self._check_factory(req.cancel, req.deadline)
        check()
        kind = self.kind_for(s.volume)
        if box is not None and len(box) != (6 if kind == "image3d" else 4):
            raise RequestError(f"box must have {6 if kind == 'image3d' else 4} numbers "
                               f"(voxel, inclusive-exclusive), got {len(box)}", code="bad_box")
        ephemeral = task == "crop_ask"
        if task in ("crop_ask", "describe") and box is None:
            raise RequestError(f"task {task!r} needs a box in voxels: "
                               + ("(k1, j1, i1, k2, j2, i2)" if kind == "image3d" else "(j1, i1, j2, i2)"),
                               code="bad_box")
        entry = self.prepare(s.volume, roi=box if ephemeral else None, timings=timings,
                             vhash=s.volume_id)
        box_text = None
        if task == "describe":
            box_text = T.format_box(T.voxel_box_to_model(box, entry.geom, kind), kind)
        q = T.build_question(task, kind, req.question, box_text)
        turns = [] if ephemeral else s.turns
        ids = self.encode_prompt(self.conversation(turns, q, kind), kind)
        if self.context_limit and len(ids) >= self.context_limit:
            raise RequestError(f"the conversation is {len(ids)} tokens long, the model's limit is "
                               f"{self.context_limit}: start a new session", code="context_full")
        if self.context_limit:  # the answer may use what is left of the context
            params.max_new_tokens = min(params.max_new_tokens, self.context_limit - len(ids))
        check()
        # Reuse the longest prefix whose KV is cached; never split the image span.
        past, lcp = None, 0
        if self.use_cache and not ephemeral and s.past is not None:
            for a, b in zip(s.kv_ids, ids):
                if a != b:
                    break
                lcp += 1
            lcp = min(lcp, len(ids) - 1)
            img = [i for i, t in enumerate(ids) if t < 0]
            if img and lcp <= img[-1]:
                lcp = 0
            if lcp > 0:
                s.past.crop(lcp)
                past = s.past
        s.past, s.kv_ids = None, []  # invalid until this answer completes
        generator = None
        if params.do_sample and params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(int(params.seed))
        return _Prepared(s, req, kind, entry, q, ids, ephemeral, lcp, past, timings, t_start,
                         check, params, generator, TextStreamer(self.tokenizer, req.on_token, self._resolver(entry)))

    def _resolver(self, entry: ImageEntry) -> Callable[[str], str] | None:
        """The answer-text rewrite of a box_refs model: each box reference token becomes its box."""
        labels = getattr(self.model.config, "box_refs", None)
        if not labels or entry.boxes is None:
            return None
        from medmvl_core.model.box_refs import resolve_box_refs

        boxes, kind = entry.boxes, self.model.box_ref_kind
        return lambda text: resolve_box_refs(text, boxes, labels, kind)

    def _prefill(self, p: "_Prepared", extend: bool = False) -> torch.Tensor:
        """Prefill the prompt's uncached suffix; returns the logits at its last token.

        extend=True (single answers): a follow-up's new text tokens go through the static cache's
        ``FastDecoder.extend`` (a captured graph on CUDA) when the fast path is in use, and the
        decoder stays loaded for the answer (``p.fast``); otherwise the plain forward.
        """
        self._hook("prefill")
        t0 = time.perf_counter()
        suffix = p.ids[p.lcp:]
        has_img = any(t < 0 for t in suffix)
        logits = self._extend_fast(p, suffix) if extend and not has_img and p.past is not None else None
        if logits is None:
            logits, p.past = self._forward(suffix, len(p.ids), p.past,
                                           p.entry.embeds if has_img else None)
        p.timings["prefill_s"] = time.perf_counter() - t0
        p.timings["prefill_tokens"] = len(suffix)
        p.timings["cached_tokens"] = p.lcp
        p.t_decode = time.perf_counter()
        return logits

    def _extend_fast(self, p: "_Prepared", suffix: list[int]) -> torch.Tensor | None:
        """Load the session cache into the FastDecoder and extend it with ``suffix`` (text tokens);
        the decoder stays locked for this answer in ``p.fast``. None when the fast path is not in
        use, busy, or the suffix is too long for one chunk (then the plain forward prefills)."""
        from medmvl_core.engine.fast_decode import CHUNKS, pick_bucket

        if len(suffix) > max(CHUNKS):
            return None
        # the cache bucket holds the prefix, the padded chunk and the answer
        fast = self._start_fast([p.past], [p.lcp], pick_bucket(len(suffix), CHUNKS) + p.params.max_new_tokens)
        if fast is None:
            return None
        try:
            with torch.inference_mode():
                x = torch.tensor([suffix], dtype=torch.long, device=self.device)
                logits = fast.extend(self.model.embed_inputs(x, None))
        except Exception as exc:  # noqa: BLE001 - fall back to the plain prefill
            self._fast_failed(exc, "static-cache prefill failed")
            return None
        p.fast = fast
        p.timings["prefill_path"] = f"static:{fast.mode}"
        return logits.to(self.dtype)

    def _use_static(self) -> bool:
        return self.decode_mode == "static" or (self.decode_mode == "auto"
                                                and self.device.type == "cuda")

    def _fast_decoder(self) -> Any:
        """The engine's one FastDecoder (static KV cache; CUDA graphs / compile on CUDA)."""
        if self._fast is None:
            from medmvl_core.engine.fast_decode import FastDecoder
            mode = "compile" if self.compile_decode else (
                "static" if self.decode_mode == "static" else "auto")
            self._fast = FastDecoder(self.model, mode=mode)
        return self._fast

    def _start_fast(self, pasts: list[Any], lengths: list[int], max_new: int) -> Any:
        """A FastDecoder loaded with these caches, or None (plain path) when unavailable/busy."""
        if not (self._use_static() and self._static_ok):
            return None
        if not self._fast_lock.acquire(blocking=False):
            return None  # another thread is decoding with it
        try:
            fast = self._fast_decoder()
            fast.start_from(pasts if len(pasts) > 1 else pasts[0],
                            lengths if len(lengths) > 1 else lengths[0], max_new)
            return fast
        except Exception as exc:  # noqa: BLE001 - any failure: fall back to the plain path
            self._fast_failed(exc, "static-cache decoding unavailable")
            return None

    def _fast_failed(self, exc: Exception, what: str) -> None:
        """A failure while holding the FastDecoder: release it; an out-of-memory error goes on to the
        caller's OOM guard, anything else switches the engine to the plain path from now on."""
        self._fast_lock.release()
        if is_oom(exc):
            raise exc
        logger.warning("%s (%s); using the plain path", what, exc)
        self._static_ok = False

    def _decode_one(self, p: "_Prepared", logits: torch.Tensor) -> tuple[list[int], str, int]:
        total = len(p.ids)
        fast, p.fast = p.fast, None  # already loaded (and locked) by the prefill's extend
        if fast is None:
            fast = self._start_fast([p.past], [total], p.params.max_new_tokens)
        used_fast = fast is not None

        def step(tok: int) -> torch.Tensor:
            nonlocal total, fast
            self._hook("decode")
            total += 1
            if fast is not None:
                try:
                    return fast.step(tok).to(logits.dtype)
                except Exception as exc:  # noqa: BLE001 - continue on the plain path
                    if is_oom(exc):
                        raise
                    logger.warning("static-cache step failed (%s); continuing on the plain path",
                                   exc)
                    self._static_ok = False
                    p.past = fast.to_dynamic(0, total - 1)
                    fast = None
                    self._fast_lock.release()
            lg, p.past = self._forward([tok], total, p.past, None)
            return lg

        try:
            out = run_decode(logits, step, p.params, self.eos_ids, p.streamer, p.check,
                             p.generator, p.on_token_id)
            if fast is not None:
                p.past = fast.to_dynamic(0, len(p.ids) + out[2])
        finally:
            if fast is not None:
                self._fast_lock.release()
        p.timings["decode_path"] = (f"static:{self._fast.mode}" if fast is not None else
                                    "static->plain" if used_fast else "plain")
        return out

    def _decode_many(self, live: list[tuple[int, "_Prepared", torch.Tensor]]
                     ) -> list[Answer | BaseException]:
        """One forward per step for all rows; on OOM fall back to decoding them one by one."""
        preps = [p for _, p, _ in live]
        try:
            with torch.inference_mode():
                outs = self._batched_decode(preps, torch.cat([lg for _, _, lg in live]))
        except BaseException as exc:  # noqa: BLE001
            if not is_oom(exc):
                raise
            logger.warning("out of memory in a batched decode; decoding the requests one by one")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            outs = []
            for _, p, lg in live:
                # restart this row from its prefill; text already streamed is not sent again
                p.streamer.ids = []
                try:
                    with self._oom_guard(p.session):
                        outs.append(self._decode_one(p, lg))
                except BaseException as e:  # noqa: BLE001
                    outs.append(e)
        results: list[Answer | BaseException] = []
        for p, out in zip(preps, outs):
            if isinstance(out, BaseException):
                p.session.drop_kv()
                results.append(out)
            else:
                results.append(self._finish(p, *out))
        return results

    def _batched_decode(self, preps: list["_Prepared"], logits: torch.Tensor
                        ) -> list[tuple[list[int], str, int] | BaseException]:
        lengths = [len(p.ids) for p in preps]
        lmax = max(lengths)
        n = len(preps)
        fast = self._start_fast([p.past for p in preps], lengths,
                                max(p.params.max_new_tokens for p in preps))
        try:
            return self._batched_loop(preps, logits, lengths, lmax, n, fast)
        finally:
            if fast is not None:
                self._fast_lock.release()

    def _batched_loop(self, preps: list["_Prepared"], logits: torch.Tensor, lengths: list[int],
                      lmax: int, n: int, fast: Any
                      ) -> list[tuple[list[int], str, int] | BaseException]:
        cache = mask = None
        if fast is None:
            cache, mask = stack_caches([p.past for p in preps], lengths)
        tokens: list[list[int]] = [[] for _ in range(n)]
        fed = [0] * n
        done: list[tuple[list[int], str, int] | BaseException | None] = [None] * n
        pad = int(getattr(self.tokenizer, "pad_token_id", None) or 0)
        greedy_rows = [not p.params.do_sample for p in preps]
        while True:
            feed = []
            # every greedy row's next token with one device->host copy (not one sync per row)
            greedy = logits.argmax(dim=-1).tolist() if any(greedy_rows) else None
            for b, p in enumerate(preps):
                if done[b] is not None:
                    feed.append(pad)
                    continue
                try:
                    p.check()
                except BaseException as exc:  # noqa: BLE001 - cancel/timeout of one row
                    done[b] = exc
                    feed.append(pad)
                    continue
                tok = (int(greedy[b]) if greedy_rows[b] else
                       int(choose_token(logits[b:b + 1], p.params, p.generator)[0]))
                tokens[b].append(tok)
                p.on_token_id(tok)
                if tok in self.eos_ids:
                    done[b] = (tokens[b], "stop", fed[b])
                else:
                    p.streamer.push(tok)
                    if len(tokens[b]) >= p.params.max_new_tokens:
                        done[b] = (tokens[b], "length", fed[b])
                feed.append(tok if done[b] is None else pad)
            if all(d is not None for d in done):
                break
            self._hook("decode")
            active = [d is None for d in done]
            if fast is not None:
                logits = fast.step(torch.tensor(feed, dtype=torch.long, device=self.device))
            else:
                x = torch.tensor([[t] for t in feed], dtype=torch.long, device=self.device)
                mask = torch.cat([mask, torch.ones(n, 1, dtype=mask.dtype, device=mask.device)], 1)
                pos = torch.tensor([[lengths[b] + fed[b]] for b in range(n)], device=self.device)
                out = self.model(input_ids=x, attention_mask=mask, position_ids=pos,
                                 past_key_values=cache, use_cache=True)
                cache, logits = out.past_key_values, out.logits[:, -1, :]
            for b in range(n):
                if active[b]:
                    fed[b] += 1
        for b, p in enumerate(preps):
            if fast is not None:
                p.past = fast.to_dynamic(b, lengths[b] + fed[b])
            else:
                p.past = split_cache(cache, b, lmax - lengths[b], lengths[b] + fed[b])
            p.timings["decode_path"] = f"batch{n}" + (f":static:{fast.mode}" if fast else "")
        return done  # type: ignore[return-value]

    def _finish(self, p: "_Prepared", tokens: list[int], reason: str, fed: int) -> Answer:
        p.streamer.finish()
        t_end = time.perf_counter()
        text = p.streamer.text()
        raw = p.streamer.raw_text()  # the conversation continues from what the model wrote
        timings = p.timings
        timings["ttft_s"] = (p.first[0] if p.first else t_end) - p.t_start
        timings["decode_s"] = t_end - p.t_decode
        timings["new_tokens"] = len(tokens)
        timings["total_s"] = t_end - p.t_start
        s = p.session
        if not p.ephemeral:
            s.turns.append((p.q, raw.strip()))
            # only registered sessions keep a cache (one-off answers and deleted sessions don't)
            if self.use_cache and self.sessions.get(s.id) is s:
                s.past, s.kv_ids = p.past, p.ids + tokens[:fed]
                self._account_kv(s)
        boxes = []
        for mb in T.find_model_boxes(text, p.kind):
            try:
                boxes.append(T.map_box(mb, p.entry.geom, s.volume, p.kind))
            except Exception as exc:  # noqa: BLE001 - a malformed box must not fail the answer
                logger.debug("box %s could not be mapped: %s", mb, exc)
        return Answer(text=text, boxes=boxes, timings=timings, token_ids=tokens,
                      finish_reason=reason, question=p.q, task=p.req.task)


@dataclass
class Request:
    """One question for :meth:`Engine.answer_batch` (same fields as :meth:`Engine.answer`)."""

    volume: Any = None
    question: str | None = None
    task: str = "ask"
    box: Sequence[float] | None = None
    max_new_tokens: int = 256
    do_sample: bool = False
    on_token: Callable[[str], None] | None = None
    cancel: Any = None
    session: Session | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    deadline: float | None = None


@dataclass
class _Prepared:
    session: Session
    req: Request
    kind: str
    entry: ImageEntry
    q: str
    ids: list[int]
    ephemeral: bool
    lcp: int
    past: Any
    timings: dict
    t_start: float
    check: Callable[[], None]
    params: SamplingParams
    generator: torch.Generator | None
    streamer: TextStreamer
    t_decode: float = 0.0
    first: list = field(default_factory=list)
    fast: Any = None  # the FastDecoder holding this answer's cache (locked), after an extend prefill

    def on_token_id(self, _tok: int) -> None:
        if not self.first:
            self.first.append(time.perf_counter())
