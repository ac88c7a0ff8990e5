"""`medmvl viewer [FILE]`: the standalone desktop viewer (extra `viewer`: qtpy + PySide6)."""

from __future__ import annotations

import argparse

NAME = "viewer"
HELP = "desktop viewer: open a CT/MR volume or 2D image, draw a box, ask the model"
EXAMPLES = ("medmvl viewer phantoms/images/ct-test-00000.nii.gz --checkpoint Resources/demo_model",)
DOCS = "docs/viewer.md"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", nargs="?", default=None,
                        help="image to open: DICOM folder, NIfTI, NRRD, MHA, PNG/JPEG, .npy")
    parser.add_argument("--checkpoint", default=None,
                        help="model folder: start a local worker on it at once")
    parser.add_argument("--python", default=None,
                        help="interpreter that runs the local worker (default: this one)")
    parser.add_argument("--device", default="auto", help="auto | cuda | cpu")
    parser.add_argument("--quantize", choices=["auto", "none", "int8", "8bit", "4bit"], default="auto",
                        help="auto (default): torch dynamic int8 on a CPU, none on a GPU; int8: CPU only; "
                             "8bit/4bit: bitsandbytes")
    parser.add_argument("--url", default=None, help="connect to a running worker instead")
    parser.add_argument("--token-file", default=None,
                        help="file holding the remote worker's token (or set MEDMVL_TOKEN)")
    parser.add_argument("--screenshot", default=None,
                        help="write a PNG of the window once the image is shown, then exit")


def run(args: argparse.Namespace) -> int:
    import os
    import sys
    from pathlib import Path

    from medmvl_core.errors import ConfigError

    try:
        from qtpy import QtCore, QtWidgets
    except Exception as exc:  # qtpy missing or no Qt binding
        raise ConfigError(f"the viewer needs Qt ({exc}); install it with "
                          "pip install 'medmvl-slicer[viewer]'") from exc
    from medmvl_core.viewer.qt_check import platform_problem
    from medmvl_core.viewer.window import ViewerWindow

    problem = platform_problem()
    if problem:  # Qt would abort with "reinstalling the application may fix this problem"
        raise ConfigError(problem)

    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication(sys.argv[:1])
    win = ViewerWindow()
    if args.file:
        win.load_path(args.file)
    if args.url:
        token = os.environ.get("MEDMVL_TOKEN", "")
        if args.token_file:
            try:
                token = Path(args.token_file).read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"--token-file {args.token_file} cannot be read ({exc}); give the file that "
                                  "holds the worker's token, or set MEDMVL_TOKEN") from None
        win.remoteRadio.setChecked(True)
        win.urlEdit.setText(args.url)
        win.tokenEdit.setText(token)
        win.controller.connect_remote(args.url, token)
    elif args.checkpoint:
        win.checkpointEdit.setText(args.checkpoint)
        win.controller.start_local(args.python or sys.executable, args.checkpoint, args.device,
                                   args.quantize)
    win.show()
    if args.screenshot:
        def shoot() -> None:
            win.grab().save(args.screenshot)
            print(f"screenshot written to {args.screenshot}")
            win.close()
        QtCore.QTimer.singleShot(300, shoot)
    return int(app.exec())
