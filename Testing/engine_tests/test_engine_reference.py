"""The engine on the fixture checkpoints: greedy answers equal MedM-VL's recorded generations,
and a cached follow-up equals recomputing the whole multi-turn prompt."""

from __future__ import annotations

import json

import pytest

from medmvl_core.engine import Engine

CASES = [("ct_chest_tiny", ["ct_volume.npy", "ct_volume_b.npy"]),
         ("2d_tiny", ["cxr.png", "cxr_b.png"])]


def _question(prompt: str) -> str:
    """The question inside MedM-VL's recorded generation prompt."""
    body = prompt.split("USER: ", 1)[1].rsplit(" ASSISTANT:", 1)[0]
    return body.split("\n", 1)[1]


@pytest.fixture(scope="module")
def loaded(reference_dir):
    from medmvl_core.model import load_checkpoint
    return {name: load_checkpoint(reference_dir / name) for name, _ in CASES}


@pytest.mark.parametrize("name,inputs", CASES)
def test_answers_equal_medmvl_generations(loaded, reference_dir, name, inputs):
    from medmvl_core.imaging import read_image
    model, proc = loaded[name]
    golden = json.loads((reference_dir / name / "golden.json").read_text())
    eng = Engine(model, proc)
    for sample, fname in zip(golden["inference_samples"], inputs):
        vol = read_image(reference_dir / "inputs" / fname)
        q = _question(sample["prompt"])
        ans = eng.answer(vol, q, max_new_tokens=12)
        expect = sample["generated_ids"][0]
        # MedM-VL's generate returns the eos too; ours stops on it
        assert ans.token_ids == expect, sample["id"]
        text = sample["generated_text"]
        assert ans.text == (text[0] if isinstance(text, list) else text)
        assert len(eng.encode_prompt(eng.conversation([], q, eng.kind_for(vol)),
                                     eng.kind_for(vol))) == sample["llm_sequence_length"]


def test_cached_follow_up_equals_full_recompute_on_ct_checkpoint(loaded, reference_dir):
    from medmvl_core.imaging import read_image
    model, proc = loaded["ct_chest_tiny"]
    vol = read_image(reference_dir / "inputs" / "ct_volume.npy")
    cached, ref = Engine(model, proc), Engine(model, proc, use_cache=False)
    s = cached.create_session(vol)
    for q in ["Generate radiology report for the CT.", "Is there a nodule in the left lung?",
              "How large is it?"]:
        got = cached.answer(question=q, session=s, max_new_tokens=8)
        rs = ref.create_session(vol)
        rs.turns = list(s.turns[:-1])
        want = ref.answer(question=q, session=rs, max_new_tokens=8)
        assert got.token_ids == want.token_ids
    assert got.timings["cached_tokens"] > 16   # the image and the history came from the cache
    # the turn-3 prompt is MedM-VL's multi-turn prompt (processor-made, history included)
    prompt = proc.prompt(cached.conversation(s.turns[:-1], "How large is it?"),
                         add_generation_prompt=True)
    assert prompt.count("<image3d>") == 1
    assert prompt.endswith("USER: How large is it? ASSISTANT:")


def test_full_model_box_maps_to_medmvl_foreground_crop(loaded, reference_dir):
    """Model box [0,0,0,1,1,1] covers exactly the region MedM-VL cropped (CropForeground box)."""
    from medmvl_core.engine import tasks as T
    from medmvl_core.imaging import read_image
    model, proc = loaded["ct_chest_tiny"]
    golden = json.loads((reference_dir / "ct_chest_tiny" / "golden.json").read_text())
    crop = golden["inference_samples"][0]["crop_foreground_box_DHW"]  # [[start, end) per axis]
    vol = read_image(reference_dir / "inputs" / "ct_volume.npy")
    eng = Engine(model, proc)
    entry = eng.prepare(vol)
    found = T.find_model_boxes("at <bx_start>[0.000, 0.000, 0.000, 1.000, 1.000, 1.000]<bx_end>",
                               "image3d")
    m = T.map_box(found[0], entry.geom, vol, "image3d")
    flat = [c for pair in crop for c in pair] if isinstance(crop[0], list) else list(crop)
    starts, ends = flat[0::2], flat[1::2]
    assert m["voxel"] == [float(v) for v in starts + ends]
    # spacing 1 mm, origin 0 at the first voxel centre, identity direction: the box's outer
    # edges lie half a voxel before the first and after the last voxel centre (x=i, y=j, z=k)
    assert m["physical_lps"] == pytest.approx([starts[2] - 0.5, starts[1] - 0.5, starts[0] - 0.5,
                                               ends[2] - 0.5, ends[1] - 0.5, ends[0] - 0.5])
    # describe: the voxel box goes back to the same model box text
    assert T.format_box(T.voxel_box_to_model(m["voxel"], entry.geom, "image3d"), "image3d") == \
        "[0.000, 0.000, 0.000, 1.000, 1.000, 1.000]"
