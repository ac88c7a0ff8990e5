"""Pure-Python text metrics of the papers (METRICS.md §1-§2): no data files needed.

- :func:`bleu1_hfe` — BLEU-1 as huggingface/evaluate ``bleu`` computes it (13a tokens, the
  TF-NMT ``compute_bleu`` with ``max_order=1``, no smoothing); per sample, x1 (not x100).
- :func:`rouge1_f` — ROUGE-1 F1 from ``rouge_score`` (no stemmer).
- :func:`normalize_word` — Uni-Med's answer normalisation with all its quirks.
- :func:`nltk_bleu` — nltk ``sentence_bleu`` BLEU-n, no smoothing (Uni-Med VQA/identify).
- :func:`token_f1` — Uni-Med's unigram F1.
"""

from __future__ import annotations

import math
import re
import warnings
from collections import Counter
from functools import lru_cache

# ---------------------------------------------------------------- BLEU-1 (huggingface/evaluate)


@lru_cache(maxsize=1)
def _tokenizer_13a():
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    return Tokenizer13a()


def tokenize_13a(text: str) -> list[str]:
    """sacrebleu's 13a tokenisation (case-sensitive), split on whitespace."""
    return _tokenizer_13a()(text).split()


def bleu1_hfe(prediction: str, reference: str) -> float:
    """Sentence BLEU-1 in [0, 1] as ``evaluate.load("bleu").compute(max_order=1)``.

    p1 = clipped unigram matches / hypothesis length; BP = 1 if hyp_len > ref_len else
    exp(1 - ref_len / hyp_len). An empty prediction or reference scores 0 (the reference code
    would divide by zero there; MedM-VL scores empty predictions 0).
    """
    hyp = tokenize_13a(prediction)
    ref = tokenize_13a(reference)
    if not hyp or not ref:
        return 0.0
    matches = sum((Counter(hyp) & Counter(ref)).values())
    p1 = matches / len(hyp)
    if p1 <= 0:
        return 0.0
    ratio = len(hyp) / len(ref)
    bp = 1.0 if ratio > 1.0 else math.exp(1.0 - 1.0 / ratio)
    return math.exp(math.log(p1)) * bp


# ---------------------------------------------------------------- ROUGE-1 (rouge_score)


@lru_cache(maxsize=1)
def _rouge1_scorer():
    from rouge_score.rouge_scorer import RougeScorer

    return RougeScorer(["rouge1"], use_stemmer=False)


def rouge1_f(prediction: str, reference: str) -> float:
    """ROUGE-1 F1 in [0, 1] (``RougeScorer(['rouge1'], use_stemmer=False)``)."""
    return float(_rouge1_scorer().score(reference, prediction)["rouge1"].fmeasure)


# ---------------------------------------------------------------- Uni-Med normalisation

_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
          "@", "`", ",", "?", "!"]
# Uni-Med writes "(?!<=\d)(\.)(?!\d)": the first group is a look-*ahead* for the literal "<=",
# which can never match at a ".", so the pattern is simply "a period not followed by a digit".
_PERIOD = re.compile(r"\.(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
# Uni-Med passes re.UNICODE (== 32) as the positional ``count`` of ``sub``: only the first 32
# periods are removed. Kept on purpose for parity.
_PERIOD_COUNT = 32
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
            "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# The VQA contraction table used by Uni-Med. Its keys with capitals ("Im", "Ive", "Id've", ...)
# can never match because words are lower-cased first, so they are left out here.
_CONTRACTIONS = dict(pair.split("=") for pair in (
    "aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've "
    "couldnt've=couldn't've didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've "
    "hadn'tve=hadn't've hasnt=hasn't havent=haven't hed=he'd hed've=he'd've he'dve=he'd've "
    "hes=he's howd=how'd howll=how'll hows=how's isnt=isn't itd=it'd itd've=it'd've "
    "it'dve=it'd've itll=it'll let's=let's maam=ma'am mightnt=mightn't mightnt've=mightn't've "
    "mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've neednt=needn't "
    "notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at "
    "'ow'sat='ow's'at shant=shan't shed've=she'd've she'dve=she'd've she's=she's "
    "shouldve=should've shouldnt=shouldn't shouldnt've=shouldn't've shouldn'tve=shouldn't've "
    "somebody'd=somebodyd somebodyd've=somebody'd've somebody'dve=somebody'd've "
    "somebodyll=somebody'll somebodys=somebody's someoned=someone'd someoned've=someone'd've "
    "someone'dve=someone'd've someonell=someone'll someones=someone's somethingd=something'd "
    "somethingd've=something'd've something'dve=something'd've somethingll=something'll "
    "thats=that's thered=there'd thered've=there'd've there'dve=there'd've therere=there're "
    "theres=there's theyd=they'd theyd've=they'd've they'dve=they'd've theyll=they'll "
    "theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've we'dve=we'd've "
    "weve=we've werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've "
    "whens=when's whered=where'd wheres=where's whereve=where've whod=who'd whod've=who'd've "
    "who'dve=who'd've wholl=who'll whos=who's whove=who've whyll=why'll whyre=why're whys=why's "
    "wont=won't wouldve=would've wouldnt=wouldn't wouldnt've=wouldn't've wouldn'tve=wouldn't've "
    "yall=y'all yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've y'alld've=y'all'd've "
    "y'all'dve=y'all'd've youd=you'd youd've=you'd've you'dve=you'd've youll=you'll "
    "youre=you're youve=you've").split())


def normalize_word(text: str) -> str:
    """Uni-Med ``normalize_word``, quirks included (METRICS.md §2).

    1. Each mark of ``_PUNCT``: deleted if the *original* text has it next to a space (or the
       original text contains a digit,digit comma anywhere), otherwise replaced by a space.
    2. Periods not followed by a digit are deleted — only the first 32 of them.
    3. Lower-case, split; number words (and "none") -> digits; a/an/the dropped;
       contractions expanded; joined by single spaces; commas removed.
    """
    original = text
    out = text
    has_digit_comma = _DIGIT_COMMA_DIGIT.search(original) is not None
    for p in _PUNCT:
        if (p + " " in original or " " + p in original) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD.sub("", out, count=_PERIOD_COUNT)
    words = [_NUMBERS.get(w, w) for w in out.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words).replace(",", "")


# ---------------------------------------------------------------- nltk BLEU-n, token F1

BLEU_WEIGHTS = {1: (1, 0, 0, 0), 2: (1 / 2, 1 / 2), 3: (1 / 3, 1 / 3, 1 / 3),
                4: (1 / 4, 1 / 4, 1 / 4, 1 / 4)}


def nltk_bleu(prediction_tokens: list[str], reference_tokens: list[str], n: int = 1) -> float:
    """nltk ``sentence_bleu([ref], hyp, weights)`` BLEU-n in [0, 1], no smoothing."""
    from nltk.translate.bleu_score import sentence_bleu

    with warnings.catch_warnings():  # nltk warns about zero higher-order counts
        warnings.simplefilter("ignore")
        return float(sentence_bleu([reference_tokens], prediction_tokens, weights=BLEU_WEIGHTS[n]))


def token_f1(prediction: str, reference: str) -> float:
    """Uni-Med ``calculate_f1score``: lower-cased whitespace unigrams, in [0, 1].

    Quirk kept: true positives count the *prediction's* occurrences of a shared word.
    """
    cand = Counter(prediction.lower().strip().split())
    ref = Counter(reference.lower().strip().split())
    if not cand or not ref:
        return 0.0
    tp = sum(c for w, c in cand.items() if w in ref)
    fp = sum(c for w, c in cand.items() if w not in ref)
    fn = sum(c for w, c in ref.items() if w not in cand)
    if tp == 0:
        return 0.0
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return 2 * precision * recall / (precision + recall)
