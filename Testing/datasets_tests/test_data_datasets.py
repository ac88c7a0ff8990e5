"""Dataset helpers: placeholder expansion detection, augmentation, content keys, the batch plan."""

from __future__ import annotations

import numpy as np
import pytest

from medmvl_core.data.datasets import encode_train, file_digest, placeholder_runs, random_flip_rot90
from medmvl_core.errors import DataError
from training.data import rank_micro_batches


class _Proc:
    """Stand-in with the processor's encode/expand contract (one sentinel per placeholder)."""

    num_image_tokens = {"image": 3, "image3d": 2}

    def __init__(self, pre_expanded=False):
        self.pre_expanded = pre_expanded

    def encode(self, conversations, mode="train"):
        ids, labels = [1], [-100]
        for turn in conversations:
            for _ in range(turn["value"].count("<image>")):
                n = 3 if self.pre_expanded else 1
                ids += [-200] * n
                labels += [-100] * n
            ids.append(7 if turn["from"] == "human" else 9)
            labels.append(-100 if turn["from"] == "human" else 9)
        return {"input_ids": ids, "labels": labels}

    def expand(self, ids, labels):
        out_i, out_l = [], []
        for i, l in zip(ids, labels):
            n = self.num_image_tokens["image"] if i == -200 else 1
            out_i += [i] * n
            out_l += [l if i >= 0 else -100] * n
        return out_i, out_l


CONV = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]


@pytest.mark.parametrize("pre_expanded", [False, True])
def test_encode_train_expands_exactly_once(pre_expanded):
    enc = encode_train(_Proc(pre_expanded), CONV, {"image": 1, "image3d": 0})
    assert enc["input_ids"] == [1, -200, -200, -200, 7, 9]
    assert enc["labels"] == [-100, -100, -100, -100, -100, 9]


def test_encode_train_checks_image_positions():
    with pytest.raises(DataError, match="1 image position"):
        encode_train(_Proc(), CONV, {"image": 2, "image3d": 0})


def test_placeholder_runs():
    assert placeholder_runs([1, -200, -200, 5, -200, -201, -201, 3]) == {"image": 2, "image3d": 1}


def test_augmentation_deterministic_and_lossless():
    vol = np.arange(3 * 4 * 5 * 5, dtype=np.float32).reshape(3, 4, 5, 5)
    outs = [random_flip_rot90(vol, np.random.Generator(np.random.PCG64([0, e, 7, 0]))) for e in range(8)]
    again = random_flip_rot90(vol, np.random.Generator(np.random.PCG64([0, 0, 7, 0])))
    assert np.array_equal(outs[0], again)
    assert all(o.shape == vol.shape and np.array_equal(np.sort(o, None), np.sort(vol, None)) for o in outs)
    assert any(not np.array_equal(o, vol) for o in outs)
    # channel axis untouched: every output channel is a transform of the same input channel
    assert all(np.array_equal(np.sort(o[c], None), np.sort(vol[c], None)) for o in outs for c in range(3))


def test_file_digest_depends_on_bytes_and_spec(tmp_path):
    f = tmp_path / "a.npy"
    f.write_bytes(b"abc")
    d1 = file_digest(f, "spec1")
    assert d1 == file_digest(f, "spec1") and d1 != file_digest(f, "spec2")
    f.write_bytes(b"abd")
    assert file_digest(f, "spec1") != d1
    (tmp_path / "series").mkdir()
    (tmp_path / "series" / "1.dcm").write_bytes(b"x")
    assert len(file_digest(tmp_path / "series")) == 64


def test_global_batch_split_is_independent_of_processes():
    order = list(range(100, 124))
    # step 1 of a global batch of 8: one process x 2 micro x 4 accumulation == 2 processes x 2 x 2 == 4 x 2 x 1
    one = sum(rank_micro_batches(order, 1, 2, 4, 1, 0), [])
    two = [sum(rank_micro_batches(order, 1, 2, 2, 2, r), []) for r in range(2)]
    four = [sum(rank_micro_batches(order, 1, 2, 1, 4, r), []) for r in range(4)]
    assert sorted(one) == sorted(sum(two, [])) == sorted(sum(four, [])) == order[8:16]
