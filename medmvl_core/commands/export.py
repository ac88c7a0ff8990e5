"""``medmvl export``: a saved conversation (JSON) as Markdown, text or a DICOM SR."""

from __future__ import annotations

import argparse

NAME = "export"
HELP = "export a saved conversation (viewer JSON) as Markdown, text or a DICOM Comprehensive 3D SR"
EXAMPLES = ("medmvl export answers.json -o answers.md",
            "medmvl export answers.json --dicom CT_SERIES/ -o answers_sr.dcm")
DOCS = "docs/saving-results.md"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("conversation", help="conversation JSON (viewer: File > Save conversation)")
    parser.add_argument("-o", "--out", required=True, help="output file; its suffix picks the format: .md, .txt, .json or .dcm (a DICOM SR, needs --dicom)")
    parser.add_argument("--dicom", default=None, metavar="DIR_OR_FILE",
                        help="the DICOM series the image was read from (needed for .dcm)")
    parser.add_argument("--series-uid", default=None, help="series to use from a folder of several")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from medmvl_core.client.records import Conversation, RecordFormatError
    from medmvl_core.errors import ConfigError
    from medmvl_core.viewer.files import KINDS, export_conversation

    src = Path(args.conversation)
    try:
        conv = Conversation.from_json(src.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {src}: {exc.strerror or exc}") from None
    except RecordFormatError as exc:
        raise ConfigError(f"{src.name}: {exc}") from None
    kind = Path(args.out).suffix.lower().lstrip(".")
    if kind not in KINDS:
        raise ConfigError(f"unknown output format .{kind}; name the output .md, .txt, .json or .dcm")
    if kind == "dcm" and not args.dicom:
        raise ConfigError("a DICOM SR references the source series: give it with --dicom DIR")
    try:
        if kind == "dcm":
            from medmvl_core.export import sr

            out = sr.write_sr(conv, sr.read_source_headers(args.dicom, args.series_uid), args.out)
        else:
            out = export_conversation(conv, args.out, kind)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    print(f"wrote {out}")
    return 0
