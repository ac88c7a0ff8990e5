"""MedM-VL JSON items: conversation validation, placeholder counts and the inference split
(``lvlm/inference.py`` at HEAD: a trailing gpt turn becomes the answer; an existing "answer" wins)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medmvl_core.errors import DataError, PlaceholderError
from medmvl_core.processing import (
    count_placeholders,
    multiturn_questions,
    split_inference_item,
    validate_conversation,
    validate_item,
)

Q = {"from": "human", "value": "<image3d>\nIs there a nodule?"}
A = {"from": "gpt", "value": "Yes."}


def test_fixture_items_are_valid(reference_dir: Path):
    for name, last in [("ct_finetune.json", "gpt"), ("cxr_finetune.json", "gpt"), ("ct_inference.json", "human"), ("cxr_inference.json", "human")]:
        for item in json.loads((reference_dir / "inputs" / name).read_text()):
            assert validate_item(item, last=last) == item["conversations"]


def test_count_placeholders():
    conv = [{"from": "human", "value": "<image><image3d>\n<image>"}, {"from": "gpt", "value": "<image3d> is odd"}]
    assert count_placeholders(conv) == {"image": 2, "image3d": 2}


@pytest.mark.parametrize(
    "conversations,message",
    [
        ("just text", "non-empty list"),
        ([], "non-empty list"),
        ([{"from": "human"}], "keys 'from' and 'value'"),
        ([{"from": "system", "value": "x"}, Q], "role 'system'"),
        ([A, Q], "'human' was expected"),
        ([Q, Q], "'gpt' was expected"),
        ([{"from": "human", "value": 3}], "string value"),
    ],
)
def test_bad_conversations(conversations, message):
    with pytest.raises(DataError, match=message):
        validate_conversation(conversations)


def test_last_role_and_counts():
    assert validate_conversation([Q, A], last="gpt") == [Q, A]
    with pytest.raises(DataError, match="drop the trailing answer"):
        validate_conversation([Q, A], last="human")
    with pytest.raises(DataError, match="add the answer"):
        validate_conversation([Q], last="gpt")
    assert validate_conversation([Q], num_images3d=1) == [Q]
    with pytest.raises(PlaceholderError, match="1 <image3d> placeholder\\(s\\) for 2 image3d"):
        validate_conversation([Q], num_images3d=2)


def test_validate_item_checks_file_lists():
    item = {"id": "s1", "conversations": [Q, A], "image3d": ["a.npy", "b.npy"]}
    with pytest.raises(PlaceholderError, match="item 's1'"):
        validate_item(item)
    with pytest.raises(PlaceholderError, match="<image> placeholder"):
        validate_item({"id": "s2", "conversations": [Q, A], "image3d": ["a.npy"], "image": ["x.png"]})
    with pytest.raises(DataError, match="'conversations'"):
        validate_item({"image": []})


def test_split_inference_item():
    item = {"id": "x", "conversations": [Q, A], "image3d": ["a.npy"]}
    conversations, answer = split_inference_item(item)
    assert conversations == [Q] and answer == "Yes."
    assert item["conversations"] == [Q, A]  # not modified
    assert split_inference_item({"conversations": [Q]}) == ([Q], "")
    assert split_inference_item({"conversations": [Q, A], "answer": "Kept."}) == ([Q], "Kept.")
    assert split_inference_item({"conversations": [Q, A, Q]}) == ([Q, A, Q], "")
    with pytest.raises(DataError, match="must be a dict with a 'conversations' list"):
        split_inference_item({"conversation": []})


def test_multiturn_questions():
    follow_up = {"from": "human", "value": "Where?"}
    assert multiturn_questions({"conversations": [Q, A, follow_up, A]}) == [Q["value"], "Where?"]
    assert multiturn_questions({"conversations": [Q, A, follow_up]}) == [Q["value"], "Where?"]
    with pytest.raises(DataError, match="turn 0 is from 'gpt' but 'human' was expected"):
        multiturn_questions({"conversations": [A]})
