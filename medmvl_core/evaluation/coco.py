"""Corpus metrics of the coco-caption toolkit (pycocoevalcap), used for Uni-Med mimic/medpix.

Only run when ``pycocoevalcap`` (which bundles the Java jars) and a Java runtime exist;
otherwise the metrics are reported as skipped with the fix (METRICS.md §2-§3). SPICE is never
used (it downloads models).
"""

from __future__ import annotations

import contextlib
import io
import logging

logger = logging.getLogger(__name__)


def coco_scores(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Corpus BLEU-1..4 (closest reference length), METEOR and ROUGE-L in [0, 1].

    Inputs are the raw strings; PTBTokenizer lower-cases and drops punctuation tokens.
    Callers drop pairs with an empty prediction or reference first (as MedM-VL does).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    with contextlib.redirect_stdout(io.StringIO()) as captured:  # the scorers print to stdout
        out = _scores(PTBTokenizer, Bleu, Meteor, Rouge, predictions, references)
    logger.debug("pycocoevalcap output: %s", captured.getvalue().strip())
    return out


def _scores(PTBTokenizer, Bleu, Meteor, Rouge, predictions, references) -> dict[str, float]:
    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": r}] for i, r in enumerate(references)})
    res = tok.tokenize({i: [{"caption": p}] for i, p in enumerate(predictions)})
    out: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res)
    for n, v in enumerate(bleu, start=1):
        out[f"coco_bleu{n}"] = float(v)
    meteor, _ = Meteor().compute_score(gts, res)
    out["coco_meteor"] = float(meteor)
    rouge, _ = Rouge().compute_score(gts, res)
    out["coco_rouge_l"] = float(rouge)
    return out
