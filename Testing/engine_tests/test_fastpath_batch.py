"""Batched decoding (``Engine.answer_batch``, the path the worker runs): each row of a
shared-step batch gets the greedy tokens transformers' ``generate`` gives it alone, stops on its
own, and the engine's one FastDecoder is reused; the KV plumbing left-pads and splits back."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from medmvl_core.engine import Engine, Request
from medmvl_core.engine.errors import CancelledError, RequestError
from medmvl_core.engine.fast_decode import dynamic_from, split_cache, stack_caches

QUESTIONS = ["Describe the image.", "Is there an abnormality in the left upper lung field?",
             "What is shown?", "Write a short report of this chest radiograph, region by region."]


@pytest.fixture(scope="module")
def tiny(reference_dir):
    from medmvl_core.imaging import read_image
    from medmvl_core.model import load_checkpoint

    torch.set_num_threads(2)
    m, proc = load_checkpoint(reference_dir / "2d_tiny")
    img = read_image(reference_dir / "inputs" / "cxr.png")
    images = [dataclasses.replace(img, array=np.roll(img.array, 3 * i, axis=2)) for i in range(4)]
    return m.eval(), proc, images


def _alone(eng: Engine, image, question: str, n: int, eos: list[int] | None = None) -> list[int]:
    """Reference: transformers generate (greedy, stopping at ``eos``, default the model's EOS)
    on the engine's prompt embeddings, this sequence alone."""
    model = eng.model
    ids = eng.encode_prompt(eng.conversation([], question, "image"), "image")
    kw = {} if eos is None else {"eos_token_id": eos}
    with torch.no_grad():
        emb = model.embed_inputs(torch.tensor([ids]), eng.prepare(image).embeds)
        out = model.llm.generate(inputs_embeds=emb, attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=n, do_sample=False, pad_token_id=0, **kw)
    return out[0].tolist()


def test_stack_caches_left_pads_and_split_cache_undoes_it():
    a = dynamic_from([(torch.ones(1, 2, 2, 3), 2 * torch.ones(1, 2, 2, 3))])
    b = dynamic_from([(3 * torch.ones(1, 2, 4, 3), 4 * torch.ones(1, 2, 4, 3))])
    cache, mask = stack_caches([a, b], [2, 4])
    assert mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    k = cache.layers[0].keys
    assert k.shape == (2, 2, 4, 3) and k[0, :, :2].abs().sum() == 0 and bool((k[0, :, 2:] == 1).all())
    back = split_cache(cache, 0, 2, 2)
    assert torch.equal(back.layers[0].keys, a.layers[0].keys)
    assert torch.equal(back.layers[0].values, a.layers[0].values)


@pytest.mark.parametrize("mode", ["static", "plain"])
def test_batch_rows_equal_single_runs(tiny, mode):
    model, proc, images = tiny
    eng = Engine(model, proc, decode_mode=mode)
    path = "batch4:static:static" if mode == "static" else "batch4"
    eos = proc.tokenizer.eos_token_id
    lengths = {len(eng.encode_prompt(eng.conversation([], q, "image"), "image")) for q in QUESTIONS}
    assert len(lengths) == 4                      # four prompt lengths: rows are left-padded
    first = _alone(eng, images[0], QUESTIONS[0], 8)
    assert len(first) == 8 and eos not in first and first[3] not in first[:3]
    stop_tok = first[3]   # a second EOS: row 0 stops at its 4th token while others run on
    eng.eos_ids = {eos, stop_tok}
    maxes = [8, 8, 8, 5]
    refs = [first[:4]] + [_alone(eng, im, q, m, eos=[eos, stop_tok])
                          for im, q, m in zip(images[1:], QUESTIONS[1:], maxes[1:])]
    streamed: list[list[str]] = [[] for _ in range(4)]
    got = eng.answer_batch([Request(volume=im, question=q, max_new_tokens=m, on_token=streamed[i].append)
                            for i, (im, q, m) in enumerate(zip(images, QUESTIONS, maxes))])
    for i in range(4):
        assert got[i].token_ids == refs[i], i
        assert got[i].finish_reason == ("stop" if refs[i][-1] in (eos, stop_tok) else "length"), i
        assert "".join(streamed[i]) == got[i].text, i
        assert got[i].timings["decode_path"] == path
        # fresh requests: one left-padded prefill for all four (in the static cache, or plain)
        assert got[i].timings["prefill_path"] == path
        assert got[i].timings["prefill_tokens"] == len(eng.encode_prompt(eng.conversation([], QUESTIONS[i], "image"),
                                                                           "image"))
    assert got[0].token_ids == first[:4] and got[0].finish_reason == "stop"
    assert len(refs[3]) == 5 and got[3].finish_reason == "length"   # its own max_new_tokens
    if mode == "plain":
        return
    # another batch (a different size) reuses the engine's one decoder object
    dec = eng.fast_path.decoder
    again = eng.answer_batch([Request(volume=im, question=q, max_new_tokens=m)
                              for im, q, m in zip(images[1:], QUESTIONS[1:], maxes[1:])])
    assert eng.fast_path.decoder is dec
    assert [a.token_ids for a in again] == refs[1:]
    assert again[0].timings["decode_path"] == "batch3:static:static"


def test_a_row_cancelled_before_its_first_token_and_a_bad_row_fail_alone(tiny):
    model, proc, images = tiny
    eng = Engine(model, proc, decode_mode="static")
    got = eng.answer_batch([Request(volume=images[0], question=QUESTIONS[0], max_new_tokens=6),
                            Request(volume=images[1], question=QUESTIONS[0], max_new_tokens=6,
                                    cancel=lambda: True),
                            Request(volume=images[2], question=QUESTIONS[0], max_new_tokens=0)])
    assert got[0].token_ids == _alone(eng, images[0], QUESTIONS[0], 6)
    assert isinstance(got[1], CancelledError) and "cancelled" in str(got[1])
    assert isinstance(got[2], RequestError) and "max_new_tokens" in str(got[2])


def test_fresh_batch_prefill_falls_back_and_a_session_with_history_joins_the_batch(tiny):
    model, proc, images = tiny
    refs = [_alone(Engine(model, proc, decode_mode="static"), im, QUESTIONS[0], 6) for im in images[:3]]
    # an out-of-memory error in the static batched decode: the batch is prefilled again on the
    # plain path (one forward) and decoded again
    calls = {"n": 0}

    def hook(stage):
        if stage == "decode":
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("CUDA out of memory (simulated)")

    eng = Engine(model, proc, decode_mode="static", fault_hook=hook)
    streamed: list[list[str]] = [[] for _ in range(3)]
    got = eng.answer_batch([Request(volume=im, question=QUESTIONS[0], max_new_tokens=6, on_token=streamed[i].append)
                            for i, im in enumerate(images[:3])])
    assert [g.token_ids for g in got] == refs
    assert ["".join(x) for x in streamed] == [g.text for g in got]      # nothing streamed twice
    assert got[0].timings["prefill_path"] == "batch3" and got[0].timings["decode_path"] == "batch3:static:static"
    assert not eng.fast_path.busy
    # a session with history in the batch: prefilled with the others, its cached prefix reused
    eng = Engine(model, proc, decode_mode="static")
    s = eng.create_session(images[0])
    eng.answer(question=QUESTIONS[0], session=s, max_new_tokens=4)
    got = eng.answer_batch([Request(session=s, question=QUESTIONS[1], max_new_tokens=5),
                            Request(volume=images[1], question=QUESTIONS[1], max_new_tokens=5)])
    assert got[0].timings["cached_tokens"] > 0 and got[0].timings["prefill_path"] == "batch2"
    assert got[0].timings["prefill_tokens"] == len(eng.encode_prompt(eng.conversation(s.turns[:-1], QUESTIONS[1], "image"),
                                                                    "image")) - got[0].timings["cached_tokens"]
    assert got[1].token_ids == _alone(eng, images[1], QUESTIONS[1], 5)
    ref = Engine(model, proc, decode_mode="plain")          # the follow-up alone, on the plain path
    r = ref.create_session(images[0])
    ref.answer(question=QUESTIONS[0], session=r, max_new_tokens=4)
    assert got[0].token_ids == ref.answer(question=QUESTIONS[1], session=r, max_new_tokens=5).token_ids
