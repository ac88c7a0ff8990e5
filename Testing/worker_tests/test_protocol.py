"""The shared protocol (medmvl_core/client/protocol.py): generation settings, the task table and
the answer schema, as the engine and the client use them."""

from __future__ import annotations

import dataclasses
import json

import pytest

from medmvl_core.client import WorkerClient, errors
from medmvl_core.client import protocol as P
from medmvl_core.client.client import message_payload


# ------------------------------------------------------------------ generation settings
def test_generation_defaults_are_greedy_and_round_trip():
    g = P.GenerationSettings()
    assert g.to_dict() == {"max_new_tokens": 256, "do_sample": False, "temperature": 1.0,
                           "top_p": 1.0, "top_k": 0, "seed": None}
    assert P.GenerationSettings.names() == tuple(g.to_dict())
    assert P.GenerationSettings.from_dict(g.replace(top_k=7).to_dict()).top_k == 7
    assert g.top_k == 0  # replace copies
    assert g.validate() is g


@pytest.mark.parametrize("changes,code,match", [
    ({"max_new_tokens": 0}, "bad_max_new_tokens", "max_new_tokens must be >= 1, got 0"),
    ({"max_new_tokens": 2.5}, "bad_max_new_tokens", "must be an int"),
    ({"do_sample": 1}, "bad_sampling", "do_sample must be a bool"),
    ({"temperature": float("nan")}, "bad_sampling", "temperature must be a float"),
    ({"temperature": -0.5}, "bad_sampling", "temperature must be >= 0"),
    ({"top_p": 0.0}, "bad_sampling", r"top_p must be > 0, got 0"),
    ({"top_p": 1.5}, "bad_sampling", r"top_p must be <= 1, got 1.5"),
    ({"top_k": -1}, "bad_sampling", "top_k must be >= 0"),
    ({"top_k": True}, "bad_sampling", "top_k must be an int"),
    ({"seed": -3}, "bad_sampling", "seed must be >= 0"),
    ({"seed": 2**64}, "bad_sampling", "seed must be <="),
    ({"do_sample": True, "temperature": 0.0}, "bad_sampling",
     "temperature must be > 0 when sampling, got 0.0"),
])
def test_bad_settings_are_refused_with_their_code(changes, code, match):
    with pytest.raises(P.SettingsError, match=match) as info:
        P.GenerationSettings(**changes).validate()
    assert info.value.code == code


def test_worker_limit_and_unknown_names():
    with pytest.raises(P.SettingsError, match=r"max_new_tokens must be in 1..64, got 65") as info:
        P.GenerationSettings(max_new_tokens=65).validate(max_new_tokens_limit=64)
    assert info.value.code == "bad_max_new_tokens"
    P.GenerationSettings(max_new_tokens=64, do_sample=True, temperature=0.7, top_k=5,
                         seed=2**64 - 1).validate(64)
    with pytest.raises(P.SettingsError, match="unknown generation setting.*top_q") as info:
        P.GenerationSettings().replace(top_q=0.5)
    assert info.value.code == "unknown_setting"


def test_engine_request_carries_the_settings_object():
    """The engine takes the protocol's settings as they are (the worker passes its request's
    settings straight through); settings given one by one apply on top of them."""
    from medmvl_core.engine import Request

    g = P.GenerationSettings(max_new_tokens=9, top_k=3)
    assert Request(question="q", generation=g).generation is g
    assert Request().generation == P.GenerationSettings()
    assert Request(generation=g, top_k=5).generation == g.replace(top_k=5) and g.top_k == 3
    with pytest.raises(P.SettingsError) as info:
        Request(max_new_token=3)
    assert info.value.code == "unknown_setting"


# ------------------------------------------------------------------ tasks
def test_task_table():
    assert P.TASKS == ("ask", "report", "describe", "find", "crop_ask")
    assert [(s.label, s.needs_question, s.needs_box) for s in P.TASK_SPECS.values()] == [
        ("Ask", True, False), ("Generate report", False, False), ("Describe region", False, True),
        ("Find", True, False), ("Ask about region", True, True)]
    from medmvl_core.client.records import TASK_LABELS  # saved records head turns by task
    assert TASK_LABELS == {"ask": "Ask", "report": "Report", "describe": "Describe region",
                           "find": "Find", "crop_ask": "Ask about region"}
    with pytest.raises(P.TaskError, match="unknown task 'segment'; use one of ask, report") as info:
        P.task_spec("segment")
    assert info.value.code == "bad_task"
    with pytest.raises(P.TaskError) as info:
        P.task_spec("find").check_question("  ")
    assert info.value.code == "empty_question"
    with pytest.raises(P.TaskError, match="needs a box in voxels") as info:
        P.task_spec("crop_ask").check_box(None)
    assert info.value.code == "bad_box"


def test_prompts_follow_the_training_data():
    """Golden prompts: MedM-VL's report instruction, the region and grounding questions of the
    phantom training data (medmvl_core/data/phantom_tasks.py)."""
    from medmvl_core.data import phantom_tasks

    box = "[0.250, 0.250, 0.500, 0.750, 0.750, 1.000]"
    assert P.task_spec("report").prompt("image3d") == "Generate radiology report for the CT."
    assert P.task_spec("report").prompt("image") == "Generate radiology report for the chest X-ray."
    assert P.task_spec("report").prompt("image3d", "  Findings?  ") == "Findings?"
    assert P.task_spec("describe").prompt("image3d", None, box) == \
        phantom_tasks.DESCRIBE_PROMPT.format(box=box)
    assert P.task_spec("describe").prompt("image3d", "Is {box} a cyst?", box) == f"Is {box} a cyst?"
    assert P.task_spec("find").prompt("image3d", "nodule") == \
        phantom_tasks.FIND_PROMPT.format(target="nodule")
    assert P.task_spec("find").prompt("image", "{box}") == \
        "Where is the {box} in this image? Please output the bounding box."
    assert P.task_spec("crop_ask").prompt("image3d", "What is this?", box) == "What is this?"


# ------------------------------------------------------------------ answers
def test_answer_schema_and_the_engine_answer():
    from medmvl_core.engine import Answer as EngineAnswer

    assert P.ANSWER_FIELDS == ("text", "boxes", "timings", "num_tokens", "finish_reason", "task",
                               "question")
    engine_fields = {f.name for f in dataclasses.fields(EngineAnswer)}
    # the worker sends the engine's answer field for field; num_tokens = len(token_ids)
    assert set(P.ANSWER_FIELDS) - {"num_tokens"} <= engine_fields and "token_ids" in engine_fields
    data = {"text": "t", "boxes": [{"voxel": [0, 0, 0, 1, 1, 1]}], "timings": {"total_s": 1.0},
            "num_tokens": 3, "finish_reason": "length", "task": "find", "question": "q?"}
    ans = P.Answer.from_event(data)
    assert ans.to_event() == data and ans.prompt_question == "q?"
    assert P.Answer.from_event({}, task="report") == P.Answer(text="", task="report")


# ------------------------------------------------------------------ the client sends them
class _Sent(Exception):
    pass


def _capture(monkeypatch):
    sent = {}

    def fake_open(self, method, path, body=None, headers=None, timeout=None):
        sent.update(method=method, path=path, body=json.loads(body))
        raise _Sent

    monkeypatch.setattr(WorkerClient, "_open", fake_open)
    return sent


def test_ask_sends_every_setting_including_top_k(monkeypatch):
    sent = _capture(monkeypatch)
    c = WorkerClient("http://127.0.0.1:9", "t")
    with pytest.raises(_Sent):
        c.ask("s1", task="find", question="nodule", top_k=20, do_sample=True, seed=3, timeout=9)
    assert sent["method"] == "POST" and sent["path"] == "/sessions/s1/messages"
    assert sent["body"] == {"task": "find", "question": "nodule", "max_new_tokens": 256,
                            "do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 20,
                            "seed": 3, "timeout_s": 9.0}
    base = P.GenerationSettings(max_new_tokens=8, top_p=0.9)
    with pytest.raises(_Sent):
        c.ask("s1", question="q", generation=base, top_p=0.5)
    assert sent["body"]["max_new_tokens"] == 8 and sent["body"]["top_p"] == 0.5
    assert sent["body"] == message_payload("ask", "q", None, base.replace(top_p=0.5))


def test_ask_refuses_unknown_names_before_sending(monkeypatch):
    sent = _capture(monkeypatch)
    c = WorkerClient("http://127.0.0.1:9", "t")
    with pytest.raises(errors.BadRequestError, match="unknown generation setting") as info:
        c.ask("s1", question="q", max_new_token=3)
    assert info.value.code == "unknown_setting"
    with pytest.raises(errors.BadRequestError, match="unknown task") as info:
        c.ask("s1", task="segment", question="q")
    assert info.value.code == "bad_task" and sent == {}
