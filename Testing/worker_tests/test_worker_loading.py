"""Loading a checkpoint into the worker's engine: devices, dtypes, quantized modes, errors."""

from __future__ import annotations

import pytest

from medmvl_core.errors import ConfigError
from medmvl_core.worker.loading import load_engine, resolve_dtype


def test_quantized_4bit_engine_answers(reference_dir):
    from medmvl_core.imaging import read_image
    eng = load_engine(reference_dir / "ct_chest_tiny", device="cpu", quantize="4bit")
    lin = eng.model.llm.model.layers[0].self_attn.q_proj
    assert "Linear4bit" in type(lin).__name__          # the LLM's layers really are 4-bit
    ans = eng.answer(read_image(reference_dir / "inputs" / "ct_volume.npy"),
                     "Generate radiology report for the CT.", max_new_tokens=5)
    assert len(ans.token_ids) == 5


@pytest.mark.parametrize("kwargs,match", [
    ({"quantize": "3bit"}, "unknown quantize"),
    ({"device": "tpu"}, "unknown device"),
    ({"dtype": "int8"}, "unknown dtype"),
])
def test_bad_options_are_config_errors(reference_dir, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        load_engine(reference_dir / "ct_chest_tiny", **kwargs)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_engine(tmp_path / "nope")


def test_default_dtype_is_fp32_on_cpu():
    import torch
    assert resolve_dtype(None, "cpu") is torch.float32
    assert resolve_dtype("bf16", "cpu") is torch.bfloat16
