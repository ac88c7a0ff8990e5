"""Batch inference: MedM-VL input/output format, length batching, sharding/merge, resume."""

from __future__ import annotations

import json

import pytest

from medmvl_core.errors import DataError
from medmvl_core.evaluation import batch_infer as bi


def _items(n):
    return [{"id": f"s{i}", "conversations": [{"from": "human", "value": "<image3d>\n" + "q" * (i % 3 + 1)},
                                              {"from": "gpt", "value": f"answer {i}"}],
             "image3d": [f"v{i}.npy"]} for i in range(n)]


def test_prepare_items_moves_trailing_answer():
    raw = _items(2) + [{"conversations": [{"from": "human", "value": "hi"}]},
                       {"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": "y"}],
                        "answer": "kept"}]
    items = bi.prepare_items(raw)
    assert items[0]["answer"] == "answer 0" and items[0]["conversations"][-1]["from"] == "human"
    assert items[2]["answer"] == ""
    assert items[3]["answer"] == "kept"
    assert raw[0]["conversations"][-1]["from"] == "gpt"      # input not mutated
    with pytest.raises(DataError, match="conversations"):
        bi.prepare_items([{"image": "x.png"}])


def test_keys_are_stable_and_duplicates_distinct():
    items = bi.prepare_items(_items(2) + _items(1))            # item 2 duplicates item 0
    keys = bi.keys_with_counts(bi.item_key(it) for it in items)
    assert keys[0].split("#")[0] == keys[2].split("#")[0] and keys[0] != keys[2]
    out = json.loads(json.dumps(items[1]))
    out["conversations"].append({"from": "gpt", "value": "generated"})
    assert bi.item_key(out, generated=True) == bi.item_key(items[1])


def test_shard_and_length_batches():
    assert bi.shard(list(range(7)), 0, 2) == [0, 2, 4, 6] and bi.shard(list(range(7)), 1, 2) == [1, 3, 5]
    with pytest.raises(ValueError):
        bi.shard([1], 2, 2)
    lengths = [5, 1, 9, 5, 3]
    assert bi.length_batches(range(5), lengths, 2) == [[2, 0], [3, 4], [1]]


def _fake_generate(calls):
    def gen(batch):
        calls.append([it["id"] for it in batch])
        return [f"gen {it['id']} ü" for it in batch]
    return gen


def test_two_ranks_then_merge_in_input_order(tmp_path):
    out = tmp_path / "out.json"
    items = bi.prepare_items(_items(5))
    keys = bi.keys_with_counts(bi.item_key(it) for it in items)
    lengths = [len(it["conversations"][0]["value"]) for it in items]
    ordered = sorted(range(5), key=lambda i: (-lengths[i], i))
    calls = []
    for rank in (1, 0):                                            # order of ranks does not matter
        bi.run_shard(items, keys, bi.shard(ordered, rank, 2), _fake_generate(calls), lengths, 2, out, rank, 2)
    assert sorted(x for c in calls for x in c) == [f"s{i}" for i in range(5)]
    assert len(bi.part_files(out)) == 2
    merged = bi.merge(keys, bi.load_done(out))
    assert [m["id"] for m in merged] == [f"s{i}" for i in range(5)]
    assert merged[3]["conversations"][-1] == {"from": "gpt", "value": "gen s3 ü"}
    assert merged[3]["answer"] == "answer 3"


def test_interrupted_run_resumes(tmp_path):
    out = tmp_path / "out.json"
    items = bi.prepare_items(_items(4))
    keys = bi.keys_with_counts(bi.item_key(it) for it in items)
    lengths = [1] * 4
    calls = []

    def flaky(batch):
        if calls:
            raise RuntimeError("killed")
        return _fake_generate(calls)(batch)

    with pytest.raises(RuntimeError):
        bi.run_shard(items, keys, [0, 1, 2, 3], flaky, lengths, 2, out, 0, 1, save_every_s=1e9,
                     on_save=lambda new: bi.atomic_write_json(out, bi.merge(keys, new)))
    first = json.loads(out.read_text(encoding="utf-8"))           # saved despite the crash
    assert [x["id"] for x in first] == ["s0", "s1"]
    done = bi.load_done(out)
    todo = [i for i, k in enumerate(keys) if k not in done]
    assert todo == [2, 3]
    calls.clear()
    bi.run_shard(items, keys, todo, _fake_generate(calls), lengths, 2, out, 0, 1)
    assert calls == [["s2", "s3"]]
    assert [m["id"] for m in bi.merge(keys, bi.load_done(out))] == ["s0", "s1", "s2", "s3"]


def test_broken_existing_output_is_a_data_error(tmp_path):
    out = tmp_path / "out.json"
    out.write_text("{")
    with pytest.raises(DataError, match="move it away"):
        bi.load_done(out)


def test_missing_media_is_reported_before_loading(tmp_path):
    items = bi.prepare_items(_items(2))
    with pytest.raises(DataError, match="2 image file"):
        bi.check_media(items, None, str(tmp_path))
