"""The engine's records: a request, its answer, a cached image, and a request being answered."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from medmvl_core.client.protocol import GenerationSettings
from medmvl_core.engine.decode import TextStreamer
from medmvl_core.engine.session import Session


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


@dataclass(init=False)
class Request:
    """One question for :meth:`Engine.answer_batch` (same fields as :meth:`Engine.answer`).

    generation: how the answer is decoded (the protocol's settings object, passed through as
    given; the engine validates it when the request is answered, so a bad setting fails that
    request only). The settings may also be given one by one as keywords
    (``Request(..., max_new_tokens=16)``); they are applied on top of ``generation``.
    """

    volume: Any = None
    question: str | None = None
    task: str = "ask"
    box: Sequence[float] | None = None
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    on_token: Callable[[str], None] | None = None
    cancel: Any = None
    session: Session | None = None
    deadline: float | None = None

    def __init__(self, volume: Any = None, question: str | None = None, task: str = "ask",
                 box: Sequence[float] | None = None, *,
                 generation: GenerationSettings | None = None,
                 on_token: Callable[[str], None] | None = None, cancel: Any = None,
                 session: Session | None = None, deadline: float | None = None,
                 **settings: Any) -> None:
        self.volume, self.question, self.task, self.box = volume, question, task, box
        base = generation if generation is not None else GenerationSettings()
        # unknown keywords raise SettingsError (code unknown_setting) naming the settings there are
        self.generation = base.replace(**settings) if settings else base
        self.on_token, self.cancel, self.session, self.deadline = on_token, cancel, session, deadline


@dataclass
class ImageEntry:
    """A preprocessed image (tensor [C, (D,) H, W]) with its geometry record and encoder output."""

    key: tuple
    tensor: torch.Tensor
    geom: Any
    embeds: torch.Tensor | None = None
    boxes: torch.Tensor | None = None  # [K, 6]: what the model's box reference tokens stand for (box_refs)


@dataclass
class Prepared:
    """A validated request on its way through prefill and decode.

    ids: the whole prompt (placeholders expanded); lcp: how many of them ``past`` (the session's
    cache, cropped) already holds, so the prefill feeds ``ids[lcp:]``. ``fast``: the FastDecoder
    holding this answer's cache (locked) after a static-cache follow-up prefill.
    """

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
    params: GenerationSettings  # a copy of req.generation, max_new_tokens capped to the context
    generator: torch.Generator | None
    streamer: TextStreamer
    t_decode: float = 0.0
    first: list = field(default_factory=list)
    fast: Any = None

    @property
    def checks(self) -> bool:
        """Whether :attr:`check` can raise (a cancel flag or a deadline was given)."""
        return self.req.cancel is not None or self.req.deadline is not None

    def on_token_id(self, _tok: int) -> None:
        if not self.first:
            self.first.append(time.perf_counter())
