"""The token loops (one sequence, or a batch sharing its steps): greedy or sampled choice,
streaming text pieces, cancel, KV bookkeeping.

How a token is chosen is the protocol's :class:`~medmvl_core.client.protocol.GenerationSettings`
(validated by the engine before a request gets here)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from medmvl_core.client.protocol import GenerationSettings


def choose_token(logits: torch.Tensor, params: GenerationSettings,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row. logits: [B, V] -> LongTensor [B]."""
    if not params.do_sample:
        return logits.argmax(dim=-1)
    scores = logits.float() / params.temperature
    if params.top_k > 0:
        kth = torch.topk(scores, min(params.top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, idx = torch.sort(scores, descending=True, dim=-1)
        probs = sorted_scores.softmax(-1)
        # drop tokens whose preceding cumulative mass already exceeds top_p (keep at least one)
        drop = probs.cumsum(-1) - probs > params.top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(-1, idx, sorted_scores)
    probs = scores.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


class TextStreamer:
    """Turns a growing list of token ids into text pieces (holds back incomplete UTF-8).

    ``resolve`` (optional) rewrites the decoded text before it is shown (box references to boxes, see
    :mod:`medmvl_core.model.box_refs`); it must only grow as tokens are added. :meth:`raw_text` is the
    text as the model wrote it (what its conversation continues from)."""

    def __init__(self, tokenizer, on_piece: Callable[[str], None] | None,
                 resolve: Callable[[str], str] | None = None):
        self.tokenizer = tokenizer
        self.on_piece = on_piece
        self.resolve = resolve
        self.ids: list[int] = []
        self.emitted = 0

    def raw_text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def text(self) -> str:
        raw = self.raw_text()
        return raw if self.resolve is None else self.resolve(raw)

    def finish(self) -> None:
        """Emit whatever is left (an incomplete character at the very end stays as U+FFFD)."""
        if self.on_piece is None:
            return
        text = self.text()
        if len(text) > self.emitted:
            piece, self.emitted = text[self.emitted:], len(text)
            self.on_piece(piece)

    def push(self, token_id: int) -> None:
        self.ids.append(int(token_id))
        if self.on_piece is None:
            return
        text = self.text()
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return
        if len(text) > self.emitted:
            piece, self.emitted = text[self.emitted:], len(text)
            self.on_piece(piece)


def run_decode(first_logits: torch.Tensor, step: Callable[[int], torch.Tensor],
               params: GenerationSettings, eos_ids: set[int], streamer: TextStreamer,
               check: Callable[[], None], generator: torch.Generator | None = None,
               on_token_id: Callable[[int], None] | None = None,
               ) -> tuple[list[int], str, int]:
    """Generate up to ``params.max_new_tokens`` tokens for one sequence.

    first_logits: [1, V] at the last prompt position. ``step(token)`` feeds one token into the
    model (extending its KV cache) and returns the next [1, V] logits. ``check()`` runs before
    every step and raises to cancel or time out. Returns (new token ids, finish reason
    "stop" | "length", number of generated tokens that were fed into the KV cache).
    """
    tokens: list[int] = []
    fed = 0
    logits = first_logits
    while True:
        check()
        tok = int(choose_token(logits, params, generator)[0])
        tokens.append(tok)
        if on_token_id is not None:
            on_token_id(tok)
        if tok in eos_ids:
            return tokens, "stop", fed
        streamer.push(tok)
        if len(tokens) >= params.max_new_tokens:
            return tokens, "length", fed
        logits = step(tok)
        fed += 1


def run_batch_decode(rows: Sequence[Any], first_logits: torch.Tensor,
                     step: Callable[[torch.Tensor], torch.Tensor], eos_ids: set[int], pad_id: int,
                     hook: Callable[[str], None] | None = None,
                     ) -> list[tuple[list[int], str, int] | BaseException]:
    """Generate for B sequences together, one ``step`` (one forward) per token for all of them.

    rows: the requests (``params``, ``check``/``checks``, ``streamer``, ``generator``,
    ``on_token_id``, as :class:`~medmvl_core.engine.records.Prepared`); first_logits: [B, V] at
    each row's last prompt position; ``step(tokens [B])`` -> next logits [B, V]. A row stops on
    its own (EOS or its max_new_tokens) and is fed ``pad_id`` from then on. The per-step work is
    tensor operations over the batch; Python runs per row only for rows that sample, stream or
    can be cancelled. Returns per row (new token ids, "stop" | "length", tokens fed into the
    cache) or the exception that row failed with (cancel, timeout).
    """
    n = len(rows)
    dev = first_logits.device
    max_new = torch.tensor([int(r.params.max_new_tokens) for r in rows], device=dev)
    eos = torch.tensor(sorted(eos_ids) or [-1], device=dev)
    finished = torch.zeros(n, dtype=torch.bool, device=dev)
    stopped = torch.zeros(n, dtype=torch.bool, device=dev)   # finished on EOS
    count = torch.zeros(n, dtype=torch.long, device=dev)
    fed = torch.zeros(n, dtype=torch.long, device=dev)
    sampled = [b for b, r in enumerate(rows) if r.params.do_sample]
    checked = [b for b, r in enumerate(rows) if getattr(r, "checks", True)]
    streaming = [b for b, r in enumerate(rows) if r.streamer.on_piece is not None]
    failed: dict[int, BaseException] = {}
    out: list[torch.Tensor] = []
    logits = first_logits
    while True:
        for b in checked:
            if b in failed:
                continue
            try:
                rows[b].check()
            except BaseException as exc:  # noqa: BLE001 - cancel/timeout of one row
                failed[b] = exc
                finished[b] = True
        tok = logits.argmax(dim=-1)
        for b in sampled:
            tok[b] = choose_token(logits[b:b + 1], rows[b].params, rows[b].generator)[0]
        active = ~finished
        tok = tok.masked_fill(finished, pad_id)
        out.append(tok)
        count += active
        at_eos = active & torch.isin(tok, eos)
        stopped |= at_eos
        finished = finished | at_eos | (active & (count >= max_new))
        if not out[1:]:
            for r in rows:
                r.on_token_id(0)   # the first token's time (time to first token)
        if streaming:
            host = torch.stack([tok, (active & ~at_eos).long()]).tolist()
            for b in streaming:
                if host[1][b]:
                    rows[b].streamer.push(host[0][b])
        if bool(finished.all()):
            break
        if hook is not None:
            hook("decode")
        fed += ~finished
        logits = step(tok.masked_fill(finished, pad_id))
    toks = torch.stack(out, 1).tolist()
    counts, stops, feds = count.tolist(), stopped.tolist(), fed.tolist()
    results: list[tuple[list[int], str, int] | BaseException] = []
    for b, r in enumerate(rows):
        if b in failed:
            results.append(failed[b])
            continue
        ids = toks[b][:counts[b]]
        if b not in streaming:
            r.streamer.ids = list(ids[:-1] if stops[b] else ids)   # EOS is not part of the text
        results.append((ids, "stop" if stops[b] else "length", feds[b]))
    return results
