"""Generated parts of the documentation: the CLI reference from the argparse parsers of ``medmvl``
and ``medmvl-train``, and the HTTP API reference from the worker's OpenAPI schema.

A docs page asks for a generated part with a marker line (an HTML comment, invisible on GitHub)::

    <!-- generated: cli medmvl -->
    <!-- generated: cli medmvl-train -->
    <!-- generated: http-api -->

``scripts/mkdocs_hooks.py`` replaces the markers while ``mkdocs build`` runs, so ``--help``, the
worker and the site cannot drift apart. ``python scripts/docs_reference.py cli medmvl`` prints a
part to stdout. ``Testing/docs_tests/test_docs_site.py`` checks the output against the parsers.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MARKER = re.compile(r"^<!-- generated: ([a-z-]+)(?: ([a-z-]+))? -->$", re.MULTILINE)
HELP_COLUMNS = "100"  # a fixed width, so the generated pages do not depend on the terminal


def _help_text(parser: argparse.ArgumentParser) -> str:
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_COLUMNS  # argparse reads the width when it builds a formatter
    try:
        return parser.format_help().rstrip() + "\n"
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old


def medmvl_parsers() -> dict[str, argparse.ArgumentParser]:
    """``{"medmvl": top-level parser, "medmvl ask": its subparser, ...}`` in registration order."""
    from medmvl_core.cli import build_parser

    top = build_parser()
    out = {"medmvl": top}
    for action in top._actions:  # argparse keeps subparsers in a private action; no public accessor
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out[f"medmvl {name}"] = sub
    return out


def medmvl_train_parsers() -> dict[str, argparse.ArgumentParser]:
    """``{"medmvl-train": the train parser, "medmvl-train encoder": ..., ...}`` from ``training.cli.COMMANDS``."""
    from training.cli import COMMANDS

    out = {}
    for name, (make_parser, _run) in COMMANDS.items():
        out["medmvl-train" if name == "train" else f"medmvl-train {name}"] = make_parser()
    return out


PROGRAMS: dict[str, Callable[[], dict[str, argparse.ArgumentParser]]] = {
    "medmvl": medmvl_parsers, "medmvl-train": medmvl_train_parsers}


def cli_markdown(program: str) -> str:
    """One section per command of ``program``: its one-line description and its full ``--help``."""
    if program not in PROGRAMS:
        raise ValueError(f"unknown program {program!r}; known: {sorted(PROGRAMS)}")
    parts = []
    for name, parser in PROGRAMS[program]().items():
        parts.append(f"### `{name}`\n")
        if parser.description:
            parts.append(parser.description.splitlines()[0].strip() + "\n")
        parts.append(f"```text\n{_help_text(parser)}```\n")
    return "\n".join(parts)


def openapi_schema() -> dict[str, Any]:
    """The worker's OpenAPI schema, built from ``create_app`` without loading a model."""
    from medmvl_core.worker import app as worker_app
    from medmvl_core.worker.settings import WorkerSettings

    settings = WorkerSettings(token="docs")
    params = list(inspect.signature(worker_app.create_app).parameters)
    if params and params[0] == "settings":
        app = worker_app.create_app(settings)
    else:
        from medmvl_core.worker.state import WorkerState

        app = worker_app.create_app(WorkerState(settings))
    return app.openapi()


def _schema_type(s: dict[str, Any]) -> str:
    if "$ref" in s:
        return f"`{s['$ref'].rsplit('/', 1)[-1]}`"
    if "anyOf" in s:
        return " or ".join(_schema_type(x) for x in s["anyOf"])
    if "enum" in s:
        return " \\| ".join(f"`{v}`" for v in s["enum"])
    if s.get("type") == "array":
        return f"list of {_schema_type(s.get('items', {}))}"
    return f"`{s.get('type', 'any')}`"


_LIMITS = (("minimum", ">="), ("exclusiveMinimum", ">"), ("maximum", "<="), ("exclusiveMaximum", "<"),
           ("minLength", "length >="), ("maxLength", "length <="), ("minItems", "items >="), ("maxItems", "items <="))


def _limits(s: dict[str, Any]) -> str:
    found = [f"{word} {s[key]}" for key, word in _LIMITS if key in s]
    for alt in s.get("anyOf", []):
        found += [f"{word} {alt[key]}" for key, word in _LIMITS if key in alt]
    return ", ".join(found)


def http_api_markdown(schema: dict[str, Any] | None = None) -> str:
    """Endpoints (method, path, summary, parameters, body, responses) and request/response models."""
    schema = schema if schema is not None else openapi_schema()
    paths = schema.get("paths") or {}
    if not paths:
        raise RuntimeError("the worker's OpenAPI schema has no paths; document the API from the code")
    info = schema.get("info", {})
    out = [f"Generated from the worker's OpenAPI schema ({info.get('title', 'worker')} "
           f"{info.get('version', '')}, OpenAPI {schema.get('openapi', '?')}).\n",
           "| method | path | summary | path parameters | JSON body | responses |",
           "|---|---|---|---|---|---|"]
    for path, ops in paths.items():
        for method, op in ops.items():
            params = ", ".join(f"`{p['name']}`" for p in op.get("parameters", []) if p.get("in") == "path") or "–"
            body = "–"
            content = (op.get("requestBody") or {}).get("content", {})
            if "application/json" in content:
                body = _schema_type(content["application/json"].get("schema", {}))
            elif content:
                body = ", ".join(f"`{c}`" for c in content)
            responses = ", ".join(sorted(op.get("responses", {})))
            out.append(f"| {method.upper()} | `{path}` | {op.get('summary', '')} | {params} | {body} | {responses} |")
    models = (schema.get("components") or {}).get("schemas") or {}
    if models:
        out.append("\n#### Request and response models\n")
        for name, model in models.items():
            props = model.get("properties") or {}
            if not props:
                continue
            required = set(model.get("required", []))
            out.append(f"**`{name}`**" + (f" — {model['description'].strip()}" if model.get("description") else "")
                       + "\n")
            out += ["| field | type | required | default | limits |", "|---|---|---|---|---|"]
            for field, prop in props.items():
                default = f"`{prop['default']}`" if "default" in prop else ""
                out.append(f"| `{field}` | {_schema_type(prop)} | {'yes' if field in required else ''} | "
                           f"{default} | {_limits(prop)} |")
            out.append("")
    return "\n".join(out) + "\n"


_cache: dict[tuple[str, str | None], str] = {}


def generated(kind: str, arg: str | None) -> str:
    """The Markdown for one marker (cached for the build: pages may share a part)."""
    key = (kind, arg)
    if key not in _cache:
        if kind == "cli":
            _cache[key] = cli_markdown(arg or "medmvl")
        elif kind == "http-api":
            _cache[key] = http_api_markdown()
        else:
            raise ValueError(f"unknown generated part {kind!r}; known: cli medmvl, cli medmvl-train, http-api")
    return _cache[key]


def expand_markers(markdown: str) -> str:
    """Replace every ``<!-- generated: ... -->`` line of a page by its generated Markdown."""
    return MARKER.sub(lambda m: generated(m.group(1), m.group(2)), markdown)


if __name__ == "__main__":
    print(generated(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None))
