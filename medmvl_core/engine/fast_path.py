"""The engine's fast-path adapter: one :class:`~medmvl_core.engine.fast_decode.FastDecoder`
(static KV cache; CUDA graphs or torch.compile on CUDA) behind a lock, used when the engine's
``decode_mode`` asks for it and switched off for good after a failure that is not out-of-memory.

Callers ask :meth:`FastPath.start` (or :meth:`acquire`) for the decoder, use it, and
:meth:`release` it; None means "use the plain path" (not wanted, switched off, or busy in
another thread)."""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Sequence

import torch

logger = logging.getLogger(__name__)


def is_oom(exc: BaseException) -> bool:
    """True for CUDA out-of-memory errors (and RuntimeErrors that say so, e.g. from other backends)."""
    oom_cls = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    if oom_cls is not None and isinstance(exc, oom_cls):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _default_factory(model: Any, mode: str) -> Any:
    from medmvl_core.engine.fast_decode import FastDecoder

    return FastDecoder(model, mode=mode)


class FastPath:
    """decode_mode: "plain" (never), "static" (always, eager static cache) or "auto" (on CUDA,
    in the FastDecoder's own "auto" mode: CUDA graphs); compile_decode asks for torch.compile.
    ``factory(model, mode)`` builds the decoder (tests substitute a broken one)."""

    def __init__(self, model: Any, device: torch.device, decode_mode: str = "auto",
                 compile_decode: bool = False,
                 factory: Callable[[Any, str], Any] | None = None):
        self.model, self.device = model, device
        self.decode_mode, self.compile_decode = decode_mode, compile_decode
        self.factory = factory or _default_factory
        self.ok = True
        self.disabled_reason: str | None = None
        self._decoder: Any = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ state
    @property
    def wanted(self) -> bool:
        """Whether the configuration asks for the fast path on this device."""
        return self.decode_mode == "static" or (self.decode_mode == "auto" and self.device.type == "cuda")

    @property
    def enabled(self) -> bool:
        """Wanted and not switched off by a failure."""
        return self.wanted and self.ok

    @property
    def busy(self) -> bool:
        """True while a request holds the decoder."""
        return self._lock.locked()

    @property
    def decoder(self) -> Any:
        """The FastDecoder once built (None before the first fast answer)."""
        return self._decoder

    @property
    def mode(self) -> str | None:
        """The decoder's mode ("graph", "compile", "static"), None before it is built."""
        return None if self._decoder is None else self._decoder.mode

    @property
    def fallback_reason(self) -> str | None:
        """Why the decoder fell back (graphs to eager) or the fast path was switched off."""
        reason = getattr(self._decoder, "fallback_reason", None)
        return reason or self.disabled_reason

    # ------------------------------------------------------------------ use
    def acquire(self) -> Any:
        """The decoder, locked for the caller; None when the fast path is off or busy."""
        if not self.enabled or not self._lock.acquire(blocking=False):
            return None
        try:
            if self._decoder is None:
                mode = "compile" if self.compile_decode else (
                    "static" if self.decode_mode == "static" else "auto")
                self._decoder = self.factory(self.model, mode)
            return self._decoder
        except Exception as exc:  # noqa: BLE001 - no fast path: the plain one serves
            self.failed(exc, "the fast decoder could not be built")
            return None

    def release(self) -> None:
        self._lock.release()

    def start(self, pasts: Sequence[Any], lengths: Sequence[int], max_new: int) -> Any:
        """The decoder loaded with these single-sequence caches (``lengths`` positions each) and
        locked for the caller, or None (plain path) when unavailable, busy or failing."""
        dec = self.acquire()
        if dec is None:
            return None
        try:
            dec.start_from(list(pasts) if len(pasts) > 1 else pasts[0],
                           list(lengths) if len(lengths) > 1 else lengths[0], max_new)
            return dec
        except Exception as exc:  # noqa: BLE001 - any failure: fall back to the plain path
            self.failed(exc, "static-cache decoding unavailable")
            return None

    def failed(self, exc: BaseException, what: str) -> None:
        """A failure while holding the decoder: release it; an out-of-memory error is raised on to
        the caller's OOM guard, anything else switches the fast path off from now on."""
        self.release()
        if is_oom(exc):
            raise exc
        self.disable(f"{what} ({exc})")

    def disable(self, why: str) -> None:
        logger.warning("%s; using the plain path", why)
        self.ok = False
        self.disabled_reason = why

    def warmup(self, batch_sizes: Sequence[int] = (1,)) -> None:
        """Capture/compile the batched decode steps now (not in a user's first question)."""
        dec = self.acquire()
        if dec is None:
            return
        try:
            dec.warmup(batch_sizes=batch_sizes)
        except Exception as exc:  # noqa: BLE001 - warm-up is an optimisation only
            logger.warning("fast-path warm-up failed: %s", exc)
        finally:
            self.release()

    def captured_step(self) -> Callable[[], torch.Tensor] | None:
        """The decoder's captured/compiled decode step for its current cache (benchmarks replay
        it alone); None where the step is eager or nothing was decoded yet."""
        return None if self._decoder is None else self._decoder.captured_step()
