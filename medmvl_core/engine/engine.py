"""The inference engine: answers questions about images, one at a time or in batches.

One engine wraps one model + processor (the same processor as training, so prompts are
byte-identical to MedM-VL's). It is driven by one thread at a time (the worker's GPU thread);
sessions and caches are safe to inspect from others. Its parts:

- :class:`~medmvl_core.engine.session.SessionStore`: conversations and their KV caches;
- :class:`~medmvl_core.engine.features.FeatureCache`: preprocessed images and encoder outputs;
- :class:`~medmvl_core.engine.fast_path.FastPath`: the static-KV-cache / CUDA-graph decoder;
- :class:`~medmvl_core.engine.single.SingleRunner` and :class:`~medmvl_core.engine.batch.BatchRunner`:
  prefill + decode of one request / of a batch, over the token loops in
  :mod:`~medmvl_core.engine.decode`.

This module holds the request flow on top: validate, build the prompt, reuse the cached prefix,
prefill, decode, record the turn.
"""

from __future__ import annotations

import copy
import logging
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from medmvl_core.client.protocol import GenerationSettings, SettingsError, TaskError, task_spec
from medmvl_core.engine import tasks as T
from medmvl_core.engine.batch import BatchRunner
from medmvl_core.engine.decode import TextStreamer
from medmvl_core.engine.errors import (CancelledError, EngineOutOfMemoryError, RequestError,
                                       RequestTimeoutError, SessionBusyError)
from medmvl_core.engine.fast_decode import llm_config
from medmvl_core.engine.fast_path import FastPath, is_oom
from medmvl_core.engine.features import FeatureCache, input_kind, supported_kinds  # noqa: F401 - re-exported
from medmvl_core.engine.hashing import volume_hash
from medmvl_core.engine.records import Answer, ImageEntry, Prepared, Request  # noqa: F401 - re-exported
from medmvl_core.engine.session import Session, SessionStore
from medmvl_core.engine.single import SingleRunner

logger = logging.getLogger(__name__)

IMAGE_TOKEN_INDEX, IMAGE3D_TOKEN_INDEX = -200, -201
_PLACEHOLDER_ID = {"image": IMAGE_TOKEN_INDEX, "image3d": IMAGE3D_TOKEN_INDEX}
PLACEHOLDERS = {"image": "<image>", "image3d": "<image3d>"}


@contextmanager
def _as_request_error() -> Iterator[None]:
    """The protocol's task / settings errors as the engine's :class:`RequestError`, same code
    and message (the engine's callers catch one error type for a bad request)."""
    try:
        yield
    except (TaskError, SettingsError) as exc:
        raise RequestError(str(exc), code=exc.code) from None


#: :meth:`Engine.warmup` skips an input kind with more image tokens than this
WARMUP_MAX_IMAGE_TOKENS = 2048


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
        if decode_mode not in ("auto", "plain", "static"):
            raise RequestError(f"decode_mode must be auto, plain or static, got {decode_mode!r}")
        self.model = model
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", None)
        params = list(model.parameters())
        self.device = params[0].device if params else torch.device("cpu")
        # the LLM's dtype: the vision encoders may run in another one (bf16 on a CPU, with an int8 LLM)
        llm_params = list(getattr(model, "llm", model).parameters())
        floats = [p.dtype for p in llm_params + params if p.dtype.is_floating_point]
        self.dtype = floats[0] if floats else torch.float32
        self.use_cache = use_cache
        self.decode_mode = decode_mode
        self.compile_decode = compile_decode
        self.fault_hook = fault_hook
        self.features = FeatureCache(model, processor, self.device, self.dtype, budget_bytes=cache_bytes,
                                     use_cache=use_cache, hook=self._hook)
        self.kinds = self.features.kinds
        self.images = self.features.images
        self.store = SessionStore(kv_cache_bytes)
        self.sessions = self.store.sessions
        self.fast_path = FastPath(model, self.device, decode_mode, compile_decode)
        self.single = SingleRunner(model, self.device, self.dtype, self.fast_path, self._hook)
        self.batches = BatchRunner(model, self.device, self.dtype, self.fast_path, self._hook)
        self.context_limit = int(getattr(llm_config(model), "max_position_embeddings", 0) or 0)
        self.max_new_tokens_limit = max_new_tokens_limit
        eos = getattr(self.tokenizer, "eos_token_id", None)
        self.eos_ids = {int(eos)} if eos is not None else set()
        self.pad_id = int(getattr(self.tokenizer, "pad_token_id", None) or 0)

    def _hook(self, stage: str) -> None:
        if self.fault_hook is not None:
            self.fault_hook(stage)

    # ------------------------------------------------------------------ parts, delegated
    def kind_for(self, volume: Any) -> str:
        """Which placeholder a volume takes; raises when the model has no path for it."""
        return self.features.kind_for(volume)

    def prepare(self, volume: Any, roi: Sequence[float] | None = None,
                timings: dict | None = None, vhash: str | None = None) -> ImageEntry:
        """Preprocess + encode ``volume`` (optionally cropped to a voxel ``roi``), with caching."""
        return self.features.prepare(volume, roi, timings, vhash)

    def create_session(self, volume: Any, volume_id: str | None = None,
                       session_id: str | None = None) -> Session:
        """Open a conversation about ``volume``; returns the session (id in ``.id``)."""
        return self.store.create(volume, volume_id, session_id)

    def get_session(self, session_id: str) -> Session:
        return self.store.get(session_id)

    def delete_session(self, session_id: str) -> None:
        self.store.delete(session_id)

    def evict_idle_sessions(self, keep: int) -> int:
        """Delete least-recently-used idle sessions until at most ``keep`` remain; returns how many."""
        return self.store.evict_idle(keep)

    def kv_bytes_used(self) -> int:
        return self.store.kv_bytes_used()

    @property
    def kv_cache_bytes(self) -> int:
        """The budget of all sessions' KV caches together (the session store's)."""
        return self.store.kv_cache_bytes

    def _use_static(self) -> bool:
        """Kept for callers written before :attr:`fast_path` (use ``fast_path.enabled``)."""
        return self.fast_path.wanted

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
            n_tokens = int(self.model.num_image_tokens(kind))
            if n_tokens > WARMUP_MAX_IMAGE_TOKENS:
                # e.g. a 2D model taking a volume slice by slice (32 x 256 tokens): its first such
                # question pays for its own kernels rather than every worker start paying minutes
                logger.info("warm-up skips %s inputs (%d image tokens)", kind, n_tokens)
                continue
            # a ramp, not a constant: min-max normalising preprocessing refuses a constant image
            ramp = (np.arange(int(np.prod(shapes[kind]))) % 2000 - 1000).astype(np.int16).reshape(shapes[kind])
            s = self.create_session(Volume(ramp))
            try:
                self.answer(question="Warm-up.", session=s, max_new_tokens=max_new_tokens)
                self.answer(question="And a follow-up question?", session=s, max_new_tokens=max_new_tokens)
            finally:
                self.delete_session(s.id)
                self.images.clear()
        if self.fast_path.decoder is not None:
            self.fast_path.warmup(batch_sizes)   # capture the batched decode steps too
        return time.perf_counter() - t0

    # ------------------------------------------------------------------ prompts
    def conversation(self, turns: Sequence[tuple[str, str]], question: str,
                     kind: str = "image3d") -> list[dict]:
        """MedM-VL conversation JSON: placeholder + newline + first question, then the turns."""
        ph = PLACEHOLDERS[kind]
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

    # ------------------------------------------------------------------ answer
    def answer(self, volume_or_image: Any = None, question: str | None = None, task: str = "ask",
               box: Sequence[float] | None = None, max_new_tokens: int | None = None,
               do_sample: bool | None = None, on_token: Callable[[str], None] | None = None,
               cancel: Any = None, *, session: Session | None = None,
               generation: GenerationSettings | None = None, deadline: float | None = None,
               **settings: Any) -> Answer:
        """Answer one question and, with a ``session``, extend its conversation.

        task: a task of the protocol's table (:data:`~medmvl_core.client.protocol.TASK_SPECS`).
        box: voxel box (k1, j1, i1, k2, j2, i2) (2D: (j1, i1, j2, i2)), inclusive-exclusive,
        for "describe" and "crop_ask". generation: the
        :class:`~medmvl_core.client.protocol.GenerationSettings` (defaults when None); the
        settings may also be given as keywords (``max_new_tokens``, ``do_sample``,
        ``temperature``, ``top_p``, ``top_k``, ``seed``), applied on top of ``generation``.
        on_token(piece) streams text. cancel: an Event-like (``is_set()``) or a callable
        returning True; checked before every decode step. deadline: ``time.monotonic()`` value
        after which the request fails with a timeout. A bad task, question, box or setting
        raises :class:`RequestError` (its ``code`` as the worker sends it).
        """
        given = {"max_new_tokens": max_new_tokens, "do_sample": do_sample}
        settings.update({k: v for k, v in given.items() if v is not None})
        with _as_request_error():  # an unknown setting name
            req = Request(volume_or_image, question, task, box, generation=generation,
                          on_token=on_token, cancel=cancel, session=session, deadline=deadline,
                          **settings)
        s = self._session_for(req)
        if not s.lock.acquire(blocking=False):
            raise SessionBusyError(f"session {s.id[:8]} is already answering; wait or cancel")
        try:
            with self._oom_guard(s):
                p = self._prepare_request(s, req)
                try:
                    logits = self.single.prefill(p, extend=True)
                    tokens, reason, fed = self.single.decode(p, logits, self.eos_ids)
                finally:
                    if p.fast is not None:  # loaded by the prefill but the decode never took it
                        p.fast = None
                        self.fast_path.release()
                return self._finish(p, tokens, reason, fed)
        finally:
            s.last_used = time.monotonic()
            s.lock.release()

    def answer_batch(self, requests: Sequence[Request]) -> list[Answer | BaseException]:
        """Answer several questions (different sessions) sharing their prefill and decode steps.

        The requests are prefilled together (each reusing its session's cached prefix) and then
        decoded with one batched forward per step; a row stops on its own. Results are in
        order: an :class:`Answer` or the exception that request failed with. Greedy tokens
        equal answering them one by one.
        """
        results: list[Answer | BaseException | None] = [None] * len(requests)
        prepared: list[tuple[int, Prepared]] = []
        locked: list[Session] = []
        try:
            for i, req in enumerate(requests):
                try:
                    s = self._session_for(req)
                    if not s.lock.acquire(blocking=False):
                        raise SessionBusyError(f"session {s.id[:8]} is already answering")
                    locked.append(s)
                    with self._oom_guard(s):
                        p = self._prepare_request(s, req)
                        self._hook("prefill")
                    prepared.append((i, p))
                except BaseException as exc:  # noqa: BLE001 - reported per request
                    results[i] = exc
            if len(prepared) == 1:
                i, p = prepared[0]
                results[i] = self._answer_alone(p, hooked=True)
            elif prepared:
                for (i, _), res in zip(prepared, self._answer_together([p for _, p in prepared])):
                    results[i] = res
        finally:
            for s in locked:
                s.last_used = time.monotonic()
                s.lock.release()
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ batches
    def _answer_together(self, preps: list[Prepared]) -> list[Answer | BaseException]:
        """Fresh requests on the fast path: one prefill into its static cache; otherwise one
        plain batched prefill (then the fast path's steps when in use); one by one when a
        batched attempt runs out of memory or fails."""
        outs = None
        if self.fast_path.enabled and all(p.past is None for p in preps):
            outs = self.batches.fresh_static(preps, self.eos_ids, self.pad_id)
        if outs is None:
            outs = self.batches.plain(preps, self.eos_ids, self.pad_id)
        if outs is None:
            return [self._answer_alone(p) for p in preps]
        results: list[Answer | BaseException] = []
        for p, out in zip(preps, outs):
            if isinstance(out, BaseException):
                p.session.drop_kv()
                results.append(out)
            else:
                results.append(self._finish(p, *out))
        return results

    def _answer_alone(self, p: Prepared, hooked: bool = False) -> Answer | BaseException:
        """Prefill and decode one prepared request on its own (a batch of one, or the fallback
        of a batch: text already streamed is not sent again)."""
        p.streamer.ids = []
        for k in ("prefill_path", "decode_path"):
            p.timings.pop(k, None)
        try:
            with self._oom_guard(p.session):
                logits = self.single.prefill(p, hook=not hooked)
                return self._finish(p, *self.single.decode(p, logits, self.eos_ids))
        except BaseException as exc:  # noqa: BLE001 - reported per request
            return exc

    # ------------------------------------------------------------------ one request
    def _session_for(self, req: Request) -> Session:
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

    @staticmethod
    def _check_factory(cancel: Any, deadline: float | None) -> Callable[[], None]:
        def check() -> None:
            if cancel is not None and (cancel.is_set() if hasattr(cancel, "is_set") else cancel()):
                raise CancelledError("the answer was cancelled")
            if deadline is not None and time.monotonic() > deadline:
                raise RequestTimeoutError("the answer took longer than the request's time limit; "
                                          "ask for fewer tokens or raise timeout_s")
        return check
    def _prepare_request(self, s: Session, req: Request) -> Prepared:
        """Validate, preprocess/encode (cached), build the prompt ids, pick the reusable prefix."""
        task, box = req.task, req.box
        with _as_request_error():
            # a copy: the context limit below caps max_new_tokens for this answer only
            params = copy.copy(req.generation).validate(self.max_new_tokens_limit)
            spec = task_spec(task)
            spec.check_question(req.question)
            spec.check_box(box)
        t_start = time.perf_counter()
        timings: dict[str, float] = {}
        check = self._check_factory(req.cancel, req.deadline)
        check()
        kind = self.kind_for(s.volume)
        if box is not None and len(box) != (6 if kind == "image3d" else 4):
            raise RequestError(f"box must have {6 if kind == 'image3d' else 4} numbers "
                               f"(voxel, inclusive-exclusive), got {len(box)}", code="bad_box")
        ephemeral = task == "crop_ask"  # the model sees the region cropped, without the history
        entry = self.prepare(s.volume, roi=box if ephemeral else None, timings=timings,
                             vhash=s.volume_id)
        box_text = None
        if box is not None and any("{box}" in p for p in spec.default_prompts.values()):
            box_text = T.format_box(T.voxel_box_to_model(box, entry.geom, kind), kind)
        with _as_request_error():
            q = spec.prompt(kind, req.question, box_text)
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
        return Prepared(s, req, kind, entry, q, ids, ephemeral, lcp, past, timings, t_start,
                         check, params, generator, TextStreamer(self.tokenizer, req.on_token,
                                                                 self.features.box_resolver(entry)))

    def _finish(self, p: Prepared, tokens: list[int], reason: str, fed: int) -> Answer:
        """The answer's text, boxes and timings; a session's turn and KV cache are recorded."""
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
            if self.use_cache and self.store.holds(s):
                s.past, s.kv_ids = p.past, p.ids + tokens[:fed]
                self.store.account(s)
        boxes = []
        for mb in T.find_model_boxes(text, p.kind):
            try:
                boxes.append(T.map_box(mb, p.entry.geom, s.volume, p.kind))
            except Exception as exc:  # noqa: BLE001 - a malformed box must not fail the answer
                logger.debug("box %s could not be mapped: %s", mb, exc)
        return Answer(text=text, boxes=boxes, timings=timings, token_ids=tokens,
                      finish_reason=reason, question=p.q, task=p.req.task)
