"""MedM-VL JSON data: record loading, row checks, validation summary, mixing by ratio, the CLI."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from medmvl_core.data.datasets import load_records, mixture_plan
from medmvl_core.data.validate import validate_data
from medmvl_core.errors import DataError


def _write(tmp_path, rows, name="d.json"):
    p = tmp_path / name
    p.write_text(json.dumps(rows))
    return p


def _row(i, image="cxr.png", q="<image>\nWhat is seen?", a="Nothing.", key="image"):
    return {"id": f"r{i}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}], key: [image]}


def test_fixture_files_are_valid(reference_dir):
    inp = reference_dir / "inputs"
    for name, kind in (("ct_finetune.json", "image3d"), ("cxr_finetune.json", "image")):
        rep = validate_data(inp / name, image_dir=inp, image3d_dir=inp)
        assert rep.ok, rep.summary()
        assert rep.rows == 1 and rep.good_rows == 1 and rep.turns == 4
        assert (rep.with_image3d if kind == "image3d" else rep.with_image) == 1
    rep = validate_data(inp / "ct_inference.json", image3d_dir=inp, require_answer=False)
    assert rep.ok and rep.rows == 2


def test_bad_rows_are_reported_by_kind(tmp_path, reference_dir):
    inp = reference_dir / "inputs"
    rows = [
        _row(0),                                                    # good
        _row(1, image="missing.png"),                               # missing file
        _row(2, q="What is seen?"),                                 # 0 placeholders, 1 image
        _row(3, q="<image><image>\nTwo?"),                          # 2 placeholders, 1 image
        {"id": "r4", "conversations": [{"from": "gpt", "value": "x"}]},  # wrong turn order
        {"id": "r5", "conversations": [{"from": "human", "value": "hi"}]},  # no answer
        _row(6, a="See <image>"),                                   # placeholder in an answer
        "not an object",
    ]
    rep = validate_data(_write(tmp_path, rows), image_dir=inp)
    counts = rep.counts()
    assert rep.rows == 8 and rep.good_rows == 1 and rep.bad_rows == 7
    assert counts["missing_file"] == 1
    assert counts["bad_placeholder"] == 3
    assert counts["bad_conversations"] == 1 and counts["no_answer"] == 1 and counts["bad_row"] == 1
    text = rep.summary()
    assert "8 rows, 1 good, 7 bad" in text and "missing.png" in text


def test_relative_path_without_dir_is_reported(tmp_path):
    rep = validate_data(_write(tmp_path, [_row(0)]))
    assert rep.counts() == {"missing_dir": 1}


def test_read_images_catches_unreadable_files(tmp_path, reference_dir):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows = [_row(0, image=str(reference_dir / "inputs" / "cxr.png")), _row(1, image=str(tmp_path / "broken.png"))]
    rep = validate_data(_write(tmp_path, rows), read_images=True)
    assert rep.counts() == {"unreadable_file": 1}
    assert rep.problems[0].index == 1


def test_load_records_error_or_counted_skip(tmp_path, reference_dir, caplog):
    inp = reference_dir / "inputs"
    p = _write(tmp_path, [_row(0), _row(1, image="missing.png"), _row(2)])
    with pytest.raises(DataError, match="1 of 3 rows") as ei:
        load_records(p, image_dir=inp, on_bad_row="error")
    assert "data.on_bad_row=skip" in str(ei.value)
    problems = []
    recs = load_records(p, image_dir=inp, on_bad_row="skip", problems_out=problems)
    assert [r.id for r in recs] == ["r0", "r2"]
    assert len(problems) == 1 and problems[0].kind == "missing_file"
    assert "skipping 1 of 3 rows" in caplog.text
    assert recs[0].images == [inp / "cxr.png"]


def test_single_string_image_and_jsonl(tmp_path, reference_dir):
    inp = reference_dir / "inputs"
    row = _row(0)
    row["image"] = "cxr.png"
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(row) + "\n" + json.dumps(_row(1)) + "\n")
    recs = load_records(p, image_dir=inp)
    assert len(recs) == 2 and recs[0].images == [inp / "cxr.png"]


def test_not_a_list_is_an_error(tmp_path):
    p = tmp_path / "d.json"
    p.write_text('{"a": 1}')
    with pytest.raises(DataError, match="JSON list"):
        load_records(p)
    p.write_text("[")
    with pytest.raises(DataError, match="not valid JSON"):
        load_records(p)
    p.write_bytes(b"\xff\xfe[\x00")  # not UTF-8: a typed error, not a UnicodeDecodeError
    with pytest.raises(DataError, match="not valid JSON"):
        load_records(p)
    with pytest.raises(DataError, match=r"does not exist; check data.datasets\[\].path"):
        load_records(tmp_path / "missing.json")


def test_mixture_plan_ratios_and_determinism():
    plan = mixture_plan([10, 4], [0.5, 2.5], epoch=0, seed=1)
    c = Counter(d for d, _ in plan)
    assert c[0] == 5 and c[1] == 10
    per_row = Counter(i for d, i in plan if d == 1)
    assert sorted(per_row.values()) == [2, 2, 3, 3]          # 2 full passes + 2 extra rows
    assert len({i for d, i in plan if d == 0}) == 5           # a fraction draws without replacement
    assert plan == mixture_plan([10, 4], [0.5, 2.5], epoch=0, seed=1)
    assert plan != mixture_plan([10, 4], [0.5, 2.5], epoch=1, seed=1)
    assert plan != mixture_plan([10, 4], [0.5, 2.5], epoch=0, seed=2)


def test_cli_validate_exit_codes(tmp_path, reference_dir, capsys):
    from training.cli import main

    inp = reference_dir / "inputs"
    assert main(["validate", "--data", str(inp / "cxr_finetune.json"), "--image-dir", str(inp)]) == 0
    assert "1 rows, 1 good, 0 bad" in capsys.readouterr().out
    bad = _write(tmp_path, [_row(0, image="missing.png")])
    assert main(["validate", "--data", str(bad), "--image-dir", str(inp)]) == 1
    assert "missing_file 1" in capsys.readouterr().out
    assert main(["validate", "--data", str(tmp_path / "none.json")]) == 2
    assert "none.json does not exist; check the path given to validate (--data)" in capsys.readouterr().err


def test_checkpoint_lengths_against_max_length(reference_dir):
    """With a processor, each row is encoded with its image tokens: MedM-VL's recorded length
    for the CT train sample is the boundary between fitting and ``too_long``."""
    from medmvl_core.model import load_checkpoint

    golden = json.loads((reference_dir / "ct_chest_tiny" / "golden.json").read_text())["train_sample"]
    n = golden["llm_sequence_length"]
    _, proc = load_checkpoint(str(reference_dir / "ct_chest_tiny"))
    inp = reference_dir / "inputs"
    fits = validate_data(inp / "ct_finetune.json", image3d_dir=inp, processor=proc, max_length=n)
    assert fits.ok and fits.lengths == [n], fits.summary()
    over = validate_data(inp / "ct_finetune.json", image3d_dir=inp, processor=proc, max_length=n - 1)
    assert not over.ok and over.counts() == {"too_long": 1}
    assert f"{n} tokens with image tokens > max_length {n - 1}" in over.summary()
