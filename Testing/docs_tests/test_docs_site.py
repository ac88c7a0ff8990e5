"""The documentation site: every page is in the navigation, a page left out fails the strict build,
the generated reference parts match the code, and the links in README.md and in error messages
point to pages and headings that exist. (``make test`` also runs the full ``mkdocs build --strict``.)"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"

spec = importlib.util.spec_from_file_location("docs_reference", ROOT / "scripts" / "docs_reference.py")
docs_reference = importlib.util.module_from_spec(spec)
spec.loader.exec_module(docs_reference)


class _Loader(yaml.SafeLoader):
    """mkdocs.yml may hold !!python/name tags (Material's emoji options); they are not needed here."""


_Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)


def _mkdocs_config() -> dict:
    return yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=_Loader)


def _nav_pages(nav) -> list[str]:
    pages = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages += _nav_pages(value) if isinstance(value, list) else [value]
    return pages


def slug(heading: str) -> str:
    """The anchor Python-Markdown's toc extension gives a heading (its default slugify)."""
    text = re.sub(r"[`*_]", "", heading)
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*$", text, re.M)}


def test_every_docs_page_is_in_the_nav():
    cfg = _mkdocs_config()
    nav = set(_nav_pages(cfg["nav"]))
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert pages - nav == set(), f"pages missing from mkdocs.yml nav: {sorted(pages - nav)}"
    assert nav - pages == set(), f"nav entries without a page: {sorted(nav - pages)}"


def test_strict_settings_and_make_targets():
    cfg = _mkdocs_config()
    assert cfg["validation"]["nav"]["omitted_files"] == "warn"
    assert cfg["validation"]["links"]["not_found"] == "warn" and cfg["validation"]["links"]["anchors"] == "warn"
    assert cfg["theme"]["name"] == "material" and cfg["site_dir"] == "site"
    make = (ROOT / "Makefile").read_text()
    assert re.search(r"^docs:.*\n\t.*mkdocs build --strict", make, re.M)
    # --quiet hides the warnings --strict counts, so a strict build would pass anything (mkdocs 1.6)
    assert not re.search(r"mkdocs build.*(--quiet|-q\b)", make)
    assert re.search(r"^test:.*\n(\t.*\n)*\t.*\bdocs\b", make, re.M), "make test must build the docs"
    assert "/site/" in (ROOT / ".gitignore").read_text()


def test_a_page_missing_from_the_nav_fails_the_strict_build(tmp_path):
    """Our validation settings, on a two-page site whose second page is not in the nav."""
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text("# Home\n")
    (docs / "orphan.md").write_text("# Orphan\n")
    cfg = {"site_name": "t", "docs_dir": str(docs), "site_dir": str(tmp_path / "site"),
           "validation": _mkdocs_config()["validation"], "nav": [{"Home": "index.md"}]}
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(cfg))
    run = [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(tmp_path / "mkdocs.yml")]
    bad = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "orphan.md" in bad.stdout + bad.stderr
    cfg["nav"].append({"Orphan": "orphan.md"})
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(cfg))
    good = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert good.returncode == 0, good.stdout + good.stderr


def test_cli_reference_is_the_help_text():
    for program in docs_reference.PROGRAMS:
        page = docs_reference.cli_markdown(program)
        parsers = docs_reference.PROGRAMS[program]()
        assert len(parsers) >= 4
        for name, parser in parsers.items():
            assert f"### `{name}`" in page
            assert docs_reference._help_text(parser) in page, f"the reference of {name} differs from its --help"
    assert "<!-- generated: cli medmvl -->" in (DOCS / "reference" / "cli.md").read_text()


def test_http_api_reference_covers_every_route():
    from medmvl_core.worker import app as worker_app  # noqa: F401 - the schema needs the worker importable

    schema = docs_reference.openapi_schema()
    page = docs_reference.http_api_markdown(schema)
    for path, ops in schema["paths"].items():
        for method in ops:
            assert f"| {method.upper()} | `{path}` |" in page
    assert "/v1/sessions/{sid}/messages" in page or "/v1/sessions/{session_id}/messages" in page
    assert "<!-- generated: http-api -->" in (DOCS / "api.md").read_text()


def test_http_api_markdown_from_a_schema():
    schema = {"openapi": "3.1.0", "info": {"title": "w", "version": "1"},
              "paths": {"/v1/x/{xid}": {"post": {"summary": "Make X", "parameters": [{"name": "xid", "in": "path"}],
                                                "requestBody": {"content": {"application/json": {
                                                    "schema": {"$ref": "#/components/schemas/XIn"}}}},
                                                "responses": {"200": {}, "422": {}}}}},
              "components": {"schemas": {"XIn": {"properties": {"n": {"type": "integer", "maximum": 9, "default": 1}},
                                                 "required": ["n"]}}}}
    page = docs_reference.http_api_markdown(schema)
    assert "| POST | `/v1/x/{xid}` | Make X | `xid` | `XIn` | 200, 422 |" in page
    assert "| `n` | `integer` | yes | `1` | <= 9 |" in page
    with pytest.raises(RuntimeError, match="no paths"):
        docs_reference.http_api_markdown({"paths": {}})


def test_unknown_generated_part_is_an_error():
    with pytest.raises(ValueError, match="unknown generated part"):
        docs_reference.expand_markers("<!-- generated: nothing -->")


def _check_link(source: Path, target: str) -> str | None:
    if re.match(r"^[a-z]+://|^mailto:", target):
        return None
    path, _, anchor = target.partition("#")
    file = (source.parent / path).resolve() if path else source
    if not file.exists():
        return f"{source.relative_to(ROOT)}: link to {target}: no such file"
    if anchor and file.suffix == ".md" and anchor not in anchors(file):
        return f"{source.relative_to(ROOT)}: link to {target}: no heading with that anchor"
    return None


def test_readme_links_resolve():
    text = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert any(link.startswith("docs/") for link in links)
    problems = [p for p in (_check_link(ROOT / "README.md", link) for link in links) if p]
    assert not problems, "\n".join(problems)


def test_readme_is_a_short_front_page():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 300
    assert not re.search(r"\bsession \d+|\bsession-\d+", text, re.I), "development history belongs in docs/history/"


def test_error_message_links_resolve():
    from medmvl_core import docs_links

    problems = [p for p in (_check_link(ROOT / "README.md", link) for link in docs_links.ALL) if p]
    assert not problems, "\n".join(problems)
    slicer_module = (ROOT / "MedMVLSlicer" / "MedMVLSlicer.py").read_text()
    for link in re.findall(r"docs/[\w./-]+\.md(?:#[\w-]+)?", slicer_module):
        assert _check_link(ROOT / "README.md", link) is None, link


def test_no_checkpoint_errors_point_to_the_docs(tmp_path):
    from medmvl_core.docs_links import CHECKPOINTS
    from medmvl_core.errors import CheckpointError
    from medmvl_core.model.loader import check_checkpoint_folder

    with pytest.raises(CheckpointError, match="does not exist") as missing:
        check_checkpoint_folder(tmp_path / "nothing")
    with pytest.raises(CheckpointError, match="not a checkpoint folder") as not_ckpt:
        check_checkpoint_folder(tmp_path)
    for exc in (missing, not_ckpt):
        assert CHECKPOINTS in str(exc.value)
    check_checkpoint_folder(ROOT / "Resources" / "demo_model")  # a real one passes


def test_no_gpu_error_points_to_the_docs():
    import torch

    from medmvl_core.docs_links import DEVICES
    from medmvl_core.errors import ConfigError
    from medmvl_core.model.loader import _check_device

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="no CUDA GPU") as exc:
        _check_device("cuda")
    assert DEVICES in str(exc.value)
    _check_device("cpu")


def test_first_answer_in_slicer_and_first_lora_finetune_are_reachable_from_the_readme():
    """README -> docs/slicer.md#your-first-answer-in-slicer and -> docs/training.md#your-first-lora-finetune,
    by links only (README links the page; the page has the section; docs/index.md links the section too)."""
    readme = (ROOT / "README.md").read_text()
    index = (DOCS / "index.md").read_text()
    for page, section in (("slicer.md", "your-first-answer-in-slicer"), ("training.md", "your-first-lora-finetune")):
        assert f"](docs/{page})" in readme
        assert section in anchors(DOCS / page)
        assert f"]({page}" in index
    assert "](training.md#your-first-lora-finetune)" in index
