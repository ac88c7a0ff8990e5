"""Multiple-choice option shuffling (``data.shuffle_choices``): per row and epoch the options of a
lettered question are put in a new order and the answer's letter follows its option."""

from __future__ import annotations

import re

import numpy as np
import pytest

from medmvl_core.data.datasets import MedMVLDataset, Record, encode_train_turns, shuffle_choice_options
from training.testing import INPUTS, REFERENCE

CHOICE = [{"from": "human", "value": "<image3d>\nGenerate radiology report for the CT."},
          {"from": "gpt", "value": "Findings: A cyst is seen in the liver. Impression: Cyst."},
          {"from": "human", "value": "Which abnormality is seen? (a) nodule (b) cyst (c) pleural effusion (d) mass"},
          {"from": "gpt", "value": "(b) cyst."},
          {"from": "human", "value": "Which one? (a) no abnormality (b) calcification (c) cyst"},
          {"from": "gpt", "value": "(c) cyst."}]


def _options(question: str) -> dict:
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"\(([a-h])\) (.*?)(?= \([a-h]\) |$)", question)}


def _check(convs):
    """Every choice answer's letter names the option it names in words."""
    for q, a in zip(convs[2::2], convs[3::2]):
        letter, word = re.match(r"\(([a-h])\) (.*)\.$", a["value"]).groups()
        assert _options(q["value"])[letter] == word


def test_options_are_permuted_and_the_letter_follows_its_option():
    before = [dict(t) for t in CHOICE]
    orders, letters = set(), set()
    for seed in range(40):
        out, n = shuffle_choice_options(CHOICE, np.random.default_rng(seed))
        assert n == 2
        assert out[:2] == CHOICE[:2]  # the report turn is not touched
        _check(out)
        for i in (2, 4):
            assert sorted(_options(out[i]["value"]).values()) == sorted(_options(CHOICE[i]["value"]).values())
            assert out[i]["value"].split("(a)")[0] == CHOICE[i]["value"].split("(a)")[0]
        orders.add(out[2]["value"])
        letters.add(out[3]["value"][:3])
    assert CHOICE == before  # the input is not modified
    assert len(orders) > 10 and letters == {"(a)", "(b)", "(c)", "(d)"}


@pytest.mark.parametrize("q,a", [
    ("Is there a nodule? (a) yes (c) no", "(a) yes."),              # letters not consecutive
    ("Which? (a) nodule", "(a) nodule."),                           # a single option
    ("Which? (a) nodule (b) mass", "A nodule."),                    # the answer has no letter
    ("Which? (a) nodule (b) mass", "(e) cyst."),                    # a letter that is no option
    ("Where is the mass (see (b) below)?", "(b) there."),           # no option list
])
def test_questions_that_are_not_lettered_options_are_kept(q, a):
    convs = [{"from": "human", "value": "<image3d>\n" + q}, {"from": "gpt", "value": a}]
    out, n = shuffle_choice_options(convs, np.random.default_rng(0))
    assert n == 0 and out == convs


def test_the_dataset_draws_a_new_order_per_epoch_and_trains_the_matching_letter():
    from medmvl_core.model import load_checkpoint

    _, proc = load_checkpoint(str(REFERENCE / "ct_chest_tiny"))
    img = str(INPUTS / "ct_volume.npy")
    recs = [Record(id=f"r{i}", conversations=CHOICE, images3d=[img], source="t.json", index=i) for i in range(4)]
    plain = MedMVLDataset(recs, proc, max_length=2048, independent_turns=True)
    ds = MedMVLDataset(recs, proc, max_length=2048, independent_turns=True, shuffle_choices=True, seed=3)
    unshuffled = encode_train_turns(proc, CHOICE)["input_ids"]
    assert plain[0]["input_ids"].tolist() == unshuffled
    seen = set()
    for epoch in range(6):
        ds.epoch = epoch
        s = ds[1]
        ids, labels = s["input_ids"].tolist(), s["labels"].tolist()
        seen.add(tuple(ids))
        # the sample is exactly the encoding of the row with that epoch's order ...
        again, _ = shuffle_choice_options(CHOICE, np.random.Generator(np.random.PCG64([3, epoch, 1, 11])))
        _check(again)
        ref = encode_train_turns(proc, again)
        assert ids == ref["input_ids"] and labels == ref["labels"]
        assert s["segments"].tolist() == ref["segments"]
        # ... and the same again when asked twice (deterministic per row and epoch)
        assert ds[1]["input_ids"].tolist() == ids
    assert len(seen) >= 4  # 6 epochs, 24 x 6 possible orders: new ones
