"""Batched decoding: each row of a shared-step batch gets its single-run greedy tokens."""

from __future__ import annotations

import threading

import pytest
import torch

from medmvl_core.engine.batching import BatchDecoder, BatchQueue, BatchRequest, left_pad
from medmvl_core.engine.fast_decode import FastPathError


@pytest.fixture(scope="module")
def model(reference_dir):
    from medmvl_core.model import load_checkpoint

    torch.set_num_threads(2)
    m, _ = load_checkpoint(reference_dir / "2d_tiny")
    return m.eval()


def _prompt(model, n: int, seed: int) -> torch.Tensor:
    ids = torch.randint(0, 800, (1, n), generator=torch.Generator().manual_seed(seed))
    return model.llm.get_input_embeddings()(ids).detach()[0]


def _alone(model, embeds: torch.Tensor, n: int) -> list[int]:
    """Reference: transformers generate on the sequence alone."""
    with torch.no_grad():
        out = model.llm.generate(inputs_embeds=embeds[None], attention_mask=torch.ones(1, embeds.shape[0], dtype=torch.long),
                                 max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0].tolist()


def test_left_pad_shapes():
    e, m = left_pad([torch.ones(2, 3), torch.ones(4, 3)])
    assert e.shape == (2, 4, 3) and m.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert e[0, :2].abs().sum() == 0


def test_batch_rows_equal_single_runs(model):
    lengths, n_new = (4, 17, 9, 30), 8
    prompts = [_prompt(model, n, s) for s, n in enumerate(lengths)]
    refs = [_alone(model, p, n_new) for p in prompts]
    stop_tok = refs[1][3]  # row 1 stops early at its 4th token (EOS), the others run on
    seen: list[int] = []
    reqs = [BatchRequest(p, max_new_tokens=n_new) for p in prompts]
    reqs[1] = BatchRequest(prompts[1], max_new_tokens=n_new, eos_ids={stop_tok}, on_token=seen.append)
    reqs[2] = BatchRequest(prompts[2], max_new_tokens=5)
    dec = BatchDecoder(model, buckets=(32, 64), max_batch=4)
    out = dec.run(reqs)
    assert out[0].tokens == refs[0] and out[0].finish_reason == "length"
    cut = refs[1].index(stop_tok) + 1
    assert out[1].tokens == refs[1][:cut] and out[1].finish_reason == "stop" and seen == refs[1][:cut]
    assert out[2].tokens == refs[2][:5] and out[2].finish_reason == "length"
    assert out[3].tokens == refs[3]
    # groups larger than max_batch are split; the decoder object is reused
    out2 = BatchDecoder(model, buckets=(32, 64), max_batch=3, decoder=dec.decoder).run(
        [BatchRequest(p, max_new_tokens=n_new) for p in prompts])
    assert [r.tokens for r in out2] == refs


def test_queue_batches_concurrent_requests_and_cancel(model):
    prompts = [_prompt(model, n, 10 + n) for n in (6, 13, 21)]
    refs = [_alone(model, p, 6) for p in prompts]
    dec = BatchDecoder(model, buckets=(32, 64), max_batch=4)
    calls = []
    real = dec.run
    dec.run = lambda reqs: calls.append(len(reqs)) or real(reqs)
    q = BatchQueue(dec, window_s=0.5)
    futs: list = [None] * 3

    def submit(i):
        futs[i] = q.submit(BatchRequest(prompts[i], max_new_tokens=6))

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [f.result(timeout=60).tokens for f in futs] == refs
    assert calls == [3]  # one shared batch
    cancelled = q.submit(BatchRequest(prompts[0], max_new_tokens=6, cancel=lambda: True)).result(timeout=60)
    assert cancelled.finish_reason == "cancelled" and cancelled.tokens == []
    q.close()
    with pytest.raises(FastPathError, match="closed"):
        q.submit(BatchRequest(prompts[0]))
    with pytest.raises(FastPathError, match="max_new_tokens"):
        dec.run([BatchRequest(prompts[0], max_new_tokens=0)])
