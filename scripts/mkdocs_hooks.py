"""MkDocs hook (``hooks:`` in mkdocs.yml): fills the generated parts of the pages (CLI reference from
the argparse parsers, HTTP API from the worker's OpenAPI schema; see ``scripts/docs_reference.py``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import docs_reference  # noqa: E402


def on_page_markdown(markdown, page, config, files):  # noqa: ANN001, ANN201 - MkDocs hook signature
    return docs_reference.expand_markers(markdown)


SCREENSHOTS = Path(__file__).resolve().parent.parent / "Resources" / "Screenshots"


def on_files(files, config):  # noqa: ANN001, ANN201 - MkDocs hook signature
    """The screenshots live in Resources/Screenshots (the README and the extension use them there);
    the site serves them as ``screenshots/NAME.png``, so pages link ``screenshots/NAME.png``."""
    from mkdocs.structure.files import File

    for png in sorted(SCREENSHOTS.glob("*.png")):
        files.append(File.generated(config, f"screenshots/{png.name}", abs_src_path=str(png)))
    return files
