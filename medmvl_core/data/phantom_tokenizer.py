"""A small byte-level BPE tokenizer trained on phantom text, in Qwen2's layout.

Same pre-tokenization as Qwen2 (its split regex, digits one by one, then byte-level), NFC
normalizer, byte-level decoder, and the three Qwen2 special tokens after the learned vocabulary:
``<|endoftext|>`` (pad), ``<|im_start|>``, ``<|im_end|>`` (eos). Saved with transformers'
``Qwen2TokenizerFast.save_pretrained`` so ``AutoTokenizer`` loads it offline.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable

from medmvl_core.errors import DataError

logger = logging.getLogger(__name__)

QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def train_phantom_tokenizer(texts: Iterable[str], out_dir: Path, vocab_size: int = 512,
                            model_max_length: int = 1024):
    """Train on ``texts`` and save to ``out_dir``; returns the transformers tokenizer.

    ``vocab_size`` counts the learned tokens (>= 256 byte tokens); the 3 specials come after.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    if vocab_size < 257:
        raise DataError(f"vocab_size {vocab_size} is too small; byte-level BPE needs at least 257")
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    hf = Qwen2TokenizerFast(tokenizer_object=tok, bos_token=None, unk_token=None, eos_token="<|im_end|>",
                            pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>", "<|im_end|>"],
                            model_max_length=model_max_length, padding_side="right")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out_dir))
    logger.info("phantom tokenizer: %d tokens", len(hf))
    return hf
