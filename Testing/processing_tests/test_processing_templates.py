"""Chat templates: registry, golden prompt strings for every MedM-VL template, label masks,
BOS / pad==eos tokenizers, and the tokenization-mismatch error.

The golden strings below were written by reading MedM-VL's template source, HEAD 225fc0f
(the fixture's commit; read through the code-search index of MSIIP/MedM-VL):
``lvlm/dataset/template/base.py`` (Template.prompt / tokenizer_special_token / make_labels),
``qwen_template.py``, ``llama_template.py`` (LlamaTemplate "</s>", Llama3Template "<|eot_id|>"),
``phi_template.py`` (PhiTemplate and Phi3Template both "<|endoftext|>"), ``pretrain_template.py``
(user turn replaced by the placeholder, caption with no end string, only the placeholder masked)
and ``formatter.py`` (first ``{{content}}`` replaced). They are not our own output.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medmvl_core.errors import RegistryError, TokenizationMismatchError
from medmvl_core.processing import TEMPLATES, ChatTemplate, get_template, register_template
from medmvl_core.processing.constants import IGNORE_INDEX
from medmvl_core.processing.templates import tokenize_with_placeholders

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions. "
)
CONV_2D = [
    {"from": "human", "value": "<image>\nWhat is shown?"},
    {"from": "gpt", "value": " A chest X-ray.\n"},
    {"from": "human", "value": "Any effusion?"},
    {"from": "gpt", "value": "No."},
]
CONV_3D_QUESTION = [{"from": "human", "value": "  <image3d>\nDescribe the CT. "}]
CAPTION = [{"from": "human", "value": "<image>\nDescribe briefly."}, {"from": "gpt", "value": " Caption text. "}]

CHAT_EOS = {"qwen2": "<|im_end|>", "llama": "</s>", "llama3": "<|eot_id|>", "phi": "<|endoftext|>", "phi3": "<|endoftext|>"}


@pytest.fixture(scope="module")
def fast_tokenizer(reference_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(reference_dir / "base" / "llm"), use_fast=True, local_files_only=True)


def _tokenizer_with_eos(reference_dir: Path, eos: str, bos: bool = False, pad: str | None = None):
    """The fixture's BPE tokenizer with ``eos`` as a special token (and optionally a BOS)."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_file(str(reference_dir / "base" / "llm" / "tokenizer.json"))
    backend.add_special_tokens([eos, "<s>"])
    if bos:
        backend.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", backend.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=eos,
        pad_token=pad or ("<|endoftext|>" if eos != "<|endoftext|>" else "<|im_start|>"),
        bos_token="<s>" if bos else None,
    )


def _supervised_text(tokenizer, labels: list[int]) -> str:
    return tokenizer.decode([t for t in labels if t != IGNORE_INDEX], skip_special_tokens=False)


def test_registry_has_medmvl_names_and_rejects_unknown_and_duplicates():
    assert set(TEMPLATES) == {"pretrain", "pretrain_image3d", "qwen2", "llama3", "llama", "phi", "phi3"}
    with pytest.raises(RegistryError) as info:
        get_template("vicuna")
    message = str(info.value)
    assert "vicuna" in message and "qwen2" in message and "pretrain_image3d" in message
    with pytest.raises(RegistryError, match="already registered"):
        register_template(ChatTemplate("qwen2", "", "{{content}}", "{{content}}", " A:", "<e>"))
    assert get_template(TEMPLATES["phi"]) is TEMPLATES["phi"]


@pytest.mark.parametrize("name", sorted(CHAT_EOS))
def test_chat_template_golden_prompts(name):
    eos = CHAT_EOS[name]
    template = get_template(name)
    assert template.render(CONV_2D) == (
        SYSTEM + "USER: <image>\nWhat is shown? ASSISTANT: A chest X-ray." + eos + "USER: Any effusion? ASSISTANT: No." + eos
    )
    assert template.render(CONV_3D_QUESTION) == SYSTEM + "USER: <image3d>\nDescribe the CT. ASSISTANT:"
    assert template.render(CONV_2D + [{"from": "human", "value": "Size?"}]) == (
        SYSTEM
        + "USER: <image>\nWhat is shown? ASSISTANT: A chest X-ray."
        + eos
        + "USER: Any effusion? ASSISTANT: No."
        + eos
        + "USER: Size? ASSISTANT:"
    )


def test_pretrain_templates_golden_prompts():
    assert get_template("pretrain").render(CAPTION) == "<image>Caption text."
    assert get_template("pretrain").render(CAPTION[:1]) == "<image>ASSISTANT:"
    caption3d = [{"from": "human", "value": "<image3d>\nAnything"}, CAPTION[1]]
    assert get_template("pretrain_image3d").render(caption3d) == "<image3d>Caption text."


def test_placeholder_chunks_are_tokenized_separately(fast_tokenizer):
    ids = tokenize_with_placeholders("USER: <image3d>\nHi <image>", fast_tokenizer)
    expected = fast_tokenizer("USER: ").input_ids + [-201] + fast_tokenizer("\nHi ").input_ids + [-200]
    assert ids == expected
    assert fast_tokenizer("USER: ").input_ids[-1] == 220  # the lone space token before the sentinel


@pytest.mark.parametrize("name", sorted(CHAT_EOS))
def test_chat_template_label_masks(reference_dir, name):
    eos = CHAT_EOS[name]
    tokenizer = _tokenizer_with_eos(reference_dir, eos)
    encoded = get_template(name).encode(CONV_2D, tokenizer, "train", max_length=512)
    assert not encoded.tokenization_mismatch
    assert encoded.input_ids.count(-200) == 1
    # answers are supervised from their space-prefixed first token through the end string
    assert _supervised_text(tokenizer, encoded.labels) == " A chest X-ray." + eos + " No." + eos
    assert encoded.labels[: encoded.input_ids.index(-200) + 1] == [IGNORE_INDEX] * (encoded.input_ids.index(-200) + 1)


@pytest.mark.parametrize("name,placeholder,sentinel", [("pretrain", "<image>", -200), ("pretrain_image3d", "<image3d>", -201)])
def test_pretrain_label_mask(fast_tokenizer, name, placeholder, sentinel):
    conv = [{"from": "human", "value": placeholder + "\nignored question"}, CAPTION[1]]
    encoded = get_template(name).encode(conv, fast_tokenizer, "train")
    assert encoded.input_ids == [sentinel] + fast_tokenizer("Caption text.").input_ids
    assert encoded.labels == [IGNORE_INDEX] + fast_tokenizer("Caption text.").input_ids


def test_bos_tokenizer_gets_one_bos_and_shifted_masks(reference_dir):
    # A BOS tokenizer: MedM-VL puts one BOS first, strips it from later chunks, counts it once in
    # round 0 and subtracts it in later rounds, so ids/labels are the no-BOS golden ones shifted by one.
    golden = json.loads((reference_dir / "ct_chest_tiny" / "golden.json").read_text())["train_sample"]
    conv = json.loads((reference_dir / golden["json"]).read_text())[0]["conversations"]
    tokenizer = _tokenizer_with_eos(reference_dir, "<|im_end|>", bos=True)
    bos = tokenizer.bos_token_id
    assert tokenizer("test string").input_ids[0] == bos
    encoded = get_template("qwen2").encode(conv, tokenizer, "train", max_length=512)
    assert encoded.input_ids == [bos] + golden["input_ids"]
    assert encoded.labels == [IGNORE_INDEX] + golden["labels"]
    assert encoded.input_ids.count(bos) == 1


def test_pad_equal_to_eos_counts_eos_tokens(reference_dir):
    # Llama-3 style: pad == eos. MedM-VL adds the eos count back into the expected length.
    golden = json.loads((reference_dir / "ct_chest_tiny" / "golden.json").read_text())["train_sample"]
    conv = json.loads((reference_dir / golden["json"]).read_text())[0]["conversations"]
    tokenizer = _tokenizer_with_eos(reference_dir, "<|im_end|>", pad="<|im_end|>")
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    encoded = get_template("qwen2").encode(conv, tokenizer, "train", max_length=512)
    assert encoded.labels == golden["labels"]


def test_tokenization_mismatch_raises_or_masks(fast_tokenizer):
    bad = [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "Odd ASSISTANT: text"}]
    template = get_template("qwen2")
    with pytest.raises(TokenizationMismatchError, match="tokenization mismatch"):
        template.encode(bad, fast_tokenizer, "train", max_length=512)
    masked = template.encode(bad, fast_tokenizer, "train", max_length=512, on_mismatch="mask")
    assert masked.tokenization_mismatch is True
    assert masked.labels == [IGNORE_INDEX] * len(masked.input_ids)


def test_no_mismatch_check_once_masked_length_reaches_max_length(fast_tokenizer):
    # MedM-VL checks only when the masked length is below model_max_length.
    conv = CONV_2D[:2] + [{"from": "human", "value": "Q2"}, {"from": "gpt", "value": "x ASSISTANT: y"}]
    template = get_template("qwen2")
    first_round = template.encode(CONV_2D[:2], fast_tokenizer, "train", max_length=512)
    encoded = template.encode(conv, fast_tokenizer, "train", max_length=len(first_round.input_ids))
    assert not encoded.tokenization_mismatch
    assert encoded.labels[: len(first_round.labels)] == first_round.labels
    assert set(encoded.labels[len(first_round.labels):]) == {IGNORE_INDEX}
