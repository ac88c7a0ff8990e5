"""Independent turns (``data.independent_turns``): a multi-turn row packed after its shared image
prefix must train exactly what its turns train one at a time, single-turn, as a model is asked at
inference — checked against separate single-turn forwards of the reference CT checkpoint."""

from __future__ import annotations

import pytest
import torch

from medmvl_core.data.datasets import MedMVLDataset, Record, TrainEncodings, encode_train, encode_train_turns, load_records
from medmvl_core.errors import DataError
from training.data import KeyedCollator, move_batch
from training.step import TrainStepModule, turn_attention_mask
from training.testing import INPUTS, REFERENCE

TURNS = [{"from": "human", "value": "<image3d>\nGenerate radiology report for the CT."},
         {"from": "gpt", "value": "Findings: A 6 mm solid nodule is seen in the right upper lobe. Impression: Nodule."},
         {"from": "human", "value": "Is there any pleural effusion?"},
         {"from": "gpt", "value": "No, there is no pleural effusion."},
         {"from": "human", "value": "Is there a nodule?"},
         {"from": "gpt", "value": "Yes."}]


def _single(i: int) -> list:
    q = TURNS[2 * i]["value"]
    return [{"from": "human", "value": q if q.startswith("<image3d>") else "<image3d>\n" + q}, TURNS[2 * i + 1]]


@pytest.fixture(scope="module")
def ct():
    from medmvl_core.model import load_checkpoint

    model, proc = load_checkpoint(str(REFERENCE / "ct_chest_tiny"))
    return model.eval(), proc


# the first and last questions share their start ("Is there a"), the middle one does not: the shared
# prefix must stop where *any* turn differs
SHARED_START = [{"from": "human", "value": "<image3d>\nIs there a nodule?"}, {"from": "gpt", "value": "Yes."},
                {"from": "human", "value": "Where is the nodule?"}, {"from": "gpt", "value": "In the right upper lobe."},
                {"from": "human", "value": "Is there a mass?"}, {"from": "gpt", "value": "No."}]


@pytest.mark.parametrize("turns", [TURNS, SHARED_START], ids=["distinct", "shared-start"])
def test_each_turn_is_its_single_turn_encoding_after_the_shared_prefix(ct, turns):
    _, proc = ct
    packed = encode_train_turns(proc, turns, {"image3d": 1})
    seg = torch.tensor(packed["segments"])
    assert sorted(set(seg.tolist())) == [0, 1, 2, 3]
    prefix = seg == 0
    assert -201 in packed["input_ids"][:int(prefix.sum())]  # the image is in the shared prefix
    assert -201 not in [v for v, s in zip(packed["input_ids"], seg.tolist()) if s > 0]  # one copy of the image
    for i in range(3):
        q = turns[2 * i]["value"]
        single = encode_train(proc, [{"from": "human", "value": q if i == 0 else "<image3d>\n" + q}, turns[2 * i + 1]])
        keep = prefix | (seg == i + 1)
        assert [v for v, k in zip(packed["input_ids"], keep) if k] == single["input_ids"]
        assert [v for v, k in zip(packed["labels"], keep) if k] == single["labels"]
        assert [v for v, k in zip(packed["position_ids"], keep) if k] == list(range(len(single["input_ids"])))


def test_packed_loss_equals_the_single_turn_losses_and_plain_multi_turn_differs(ct):
    model, proc = ct
    img = str(INPUTS / "ct_volume.npy")
    rec = Record(id="r", conversations=TURNS, images=[], images3d=[img], source="t.json", index=0)
    singles = [Record(id=f"s{i}", conversations=_single(i), images=[], images3d=[img], source="t.json", index=i)
               for i in range(3)]
    # a shorter second row in the same batch: padding must not change anything
    other = Record(id="o", conversations=[_single(1)[0], TURNS[3]], images=[], images3d=[img],
                   source="t.json", index=9)
    step = TrainStepModule(model)

    def loss(recs, turns):
        ds = MedMVLDataset(recs, proc, max_length=2048, independent_turns=turns)
        inputs, _ = move_batch(KeyedCollator(proc)([ds[i] for i in range(len(recs))]), torch.device("cpu"), None)
        with torch.no_grad():
            s, n, _ = step(**inputs)
        return float(s), int(n)

    want = [loss([r], False) for r in singles]
    got = loss([rec], True)
    assert got[1] == sum(n for _, n in want)
    assert got[0] == pytest.approx(sum(s for s, _ in want), rel=1e-5)
    both = loss([rec, other], True)
    alone = loss([other], True)
    assert both[1] == got[1] + alone[1] and both[0] == pytest.approx(got[0] + alone[0], rel=1e-5)
    plain = loss([rec], False)  # multi-turn: later answers see earlier ones, so the loss is not the same
    assert plain[0] != pytest.approx(got[0], rel=1e-3)


def test_turn_mask_sees_prefix_and_own_turn_only():
    seg = torch.tensor([[0, 0, 1, 1, 2, 2, -1]])
    ok = turn_attention_mask(seg)[0, 0] == 0
    assert ok[3].tolist() == [True, True, True, True, False, False, False]
    assert ok[4].tolist() == [True, True, False, False, True, False, False]
    assert ok[6].tolist() == [False] * 6 + [True]  # padding sees itself only: no empty row
    assert not ok[1, 2]  # causal


def test_turn_errors_say_what_to_fix(ct):
    _, proc = ct
    bad_lead = [{"from": "human", "value": "Look at <image3d> please"}, TURNS[1]]
    with pytest.raises(DataError, match="first question must start with the image placeholder"):
        encode_train_turns(proc, bad_lead)
    bad_later = TURNS[:2] + [{"from": "human", "value": "<image3d>\nAnd this one?"}, TURNS[3]]
    with pytest.raises(DataError, match="question 2 holds an image placeholder"):
        encode_train_turns(proc, bad_later)
    with pytest.raises(DataError, match="every question needs its answer"):
        encode_train_turns(proc, TURNS[:3])


def test_config_flag_reaches_the_training_data(ct, tmp_path):
    import json

    import yaml

    from training.config import load_config
    from training.data import load_train_data, make_dataset

    _, proc = ct
    rows = [{"id": "r", "conversations": TURNS, "image3d": ["ct_volume.npy"]}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    run = {"model": {"llm": {"config": {"model_type": "qwen2"}}, "tokenizer": "x"},
           "data": {"datasets": [{"path": str(tmp_path / "d.json"), "image3d_dir": str(INPUTS)}],
                    "independent_turns": True}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    cfg = load_config(tmp_path / "run.yaml")
    assert cfg.data.independent_turns
    data = load_train_data(cfg, proc, 2048)
    sample = make_dataset(data.records, proc, cfg, 2048, None)[0]
    assert sample["segments"].max() == 3 and sample["position_ids"].shape == sample["input_ids"].shape
    # the row-length check measures the packed row, not the multi-turn one
    n = len(sample["input_ids"])
    assert n != len(encode_train(proc, TURNS)["input_ids"])
    assert load_train_data(cfg, proc, n).sizes == [1]
    with pytest.raises(DataError, match="more than model.max_length|too_long"):
        load_train_data(cfg, proc, n - 1)


def test_multi_turn_share_keeps_some_rows_plain_and_a_mixed_batch_adds_up(ct):
    model, proc = ct
    img = str(INPUTS / "ct_volume.npy")
    recs = [Record(id=f"r{i}", conversations=TURNS, images=[], images3d=[img], source="t.json", index=i)
            for i in range(40)]
    ds = MedMVLDataset(recs, proc, max_length=2048, independent_turns=True, multi_turn_share=0.5)
    picks = [ds.independent(i) for i in range(40)]
    assert 8 <= sum(picks) <= 32  # about half packed, half plain
    ds.epoch = 1
    assert [ds.independent(i) for i in range(40)] != picks  # drawn again each epoch
    plain_i, packed_i = picks.index(False), picks.index(True)
    ds.epoch = 0
    plain, packed = ds[plain_i], ds[packed_i]
    assert plain["input_ids"].tolist() == encode_train(proc, TURNS)["input_ids"]
    assert set(plain["segments"].tolist()) == {1} and plain["position_ids"].tolist() == list(range(len(plain["input_ids"])))
    assert packed["segments"].max() == 3
    step = TrainStepModule(model)

    def loss(samples):
        inputs, _ = move_batch(KeyedCollator(proc)(samples), torch.device("cpu"), None)
        with torch.no_grad():
            s, n, _ = step(**inputs)
        return float(s), int(n)

    no_seg = {k: v for k, v in plain.items() if k not in ("segments", "position_ids")}
    both, a, b = loss([plain, packed]), loss([no_seg]), loss([packed])
    assert both[1] == a[1] + b[1] and both[0] == pytest.approx(a[0] + b[0], rel=1e-5)


@pytest.mark.parametrize("budget", [TrainEncodings.MAX_BYTES, 0], ids=["remembered", "over-budget"])
def test_remembered_encodings_follow_each_epochs_mode(ct, budget, monkeypatch):
    # the dataset encodes a row's text once per mode (packed / plain) and reuses it: every epoch must
    # still give each row the encoding of the mode drawn for it, equal to a fresh encoding
    _, proc = ct
    monkeypatch.setattr(TrainEncodings, "MAX_BYTES", budget)
    turns = [TURNS, SHARED_START]
    recs = [Record(id=f"r{i}", conversations=turns[i % 2], images=[], images3d=[str(INPUTS / "ct_volume.npy")],
                    source="t.json", index=i) for i in range(12)]
    ds = MedMVLDataset(recs, proc, max_length=2048, independent_turns=True, multi_turn_share=0.5,
                       skip_pixels=lambda key: True)
    seen = set()
    for epoch in range(4):
        ds.epoch = epoch
        for i in range(12):
            packed = ds.independent(i)
            seen.add((i, packed))
            want = (encode_train_turns if packed else encode_train)(proc, turns[i % 2])
            got = ds[i]
            assert got["input_ids"].dtype == torch.long
            assert got["input_ids"].tolist() == want["input_ids"] and got["labels"].tolist() == want["labels"]
            assert int(got["segments"].max()) == (3 if packed else 1)
    assert {packed for _, packed in seen} == {True, False}
    assert len(ds.encodings) == (len(seen) if budget else 0)  # one entry per (row, mode) used


def test_the_row_check_encodings_are_the_datasets(ct, monkeypatch):
    # check_rows encodes every row in each mode it may train with; the dataset given those encodings
    # encodes nothing again, whatever mode each epoch draws
    from training.data import check_rows

    _, proc = ct
    recs = [Record(id=f"r{i}", conversations=TURNS, images=[], images3d=[str(INPUTS / "ct_volume.npy")],
                   source="t.json", index=i) for i in range(6)]
    enc = TrainEncodings(proc, independent_turns=True)
    good, skipped = check_rows(recs, proc, 2048, "error", "t.json", True, 0.5, enc)
    assert len(good) == 6 and skipped == 0 and len(enc) == 12
    calls = []
    import medmvl_core.data.datasets as dsmod
    for name in ("encode_train", "encode_train_turns"):
        real = getattr(dsmod, name)
        monkeypatch.setattr(dsmod, name, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    ds = MedMVLDataset(good, proc, max_length=2048, independent_turns=True, multi_turn_share=0.5,
                       skip_pixels=lambda key: True, encodings=enc)
    for epoch in range(3):
        ds.epoch = epoch
        for i in range(6):
            assert ds[i]["input_ids"].tolist() == enc.get(recs[i], ds.independent(i))["input_ids"].tolist()
    assert calls == [] and len(enc) == 12
    with pytest.raises(ValueError, match="independent_turns"):
        MedMVLDataset(good, proc, independent_turns=False, encodings=enc)


def test_multi_turn_share_config_errors(tmp_path):
    import yaml

    from medmvl_core.errors import ConfigError
    from training.config import load_config

    run = {"model": {"llm": {"config": {"model_type": "qwen2"}}, "tokenizer": "x"},
           "data": {"datasets": [{"path": "d.json"}], "multi_turn_share": 0.5}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    with pytest.raises(ConfigError, match="only applies with data.independent_turns"):
        load_config(tmp_path / "run.yaml")
    with pytest.raises(ConfigError, match=r"must be in \[0, 1\]"):
        load_config(tmp_path / "run.yaml", ["data.independent_turns=true", "data.multi_turn_share=1.5"])
    assert load_config(tmp_path / "run.yaml", ["data.independent_turns=true"]).data.multi_turn_share == 0.5
