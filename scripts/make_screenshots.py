"""Write the README screenshots from the real viewer widgets, offscreen, with the embedded demo
model answering on a synthetic test phantom (CPU is enough):

- ``viewer_three_views.png``: the whole window: axial / coronal / sagittal views, the box the
  demo model found for "nodule" (green) and a drawn region (yellow), the conversation;
- ``panel_conversation.png``: the MedM-VL panel: model identity and intended use, a report, a
  Find with its box in words, a question about the drawn region;
- ``viewer_radiograph_find.png``: the radiograph demo model (Resources/demo_model_2d) on an unseen
  radiograph phantom (PNG): a report and the box it found for the phantom's finding.

Run from the repository root: ``python scripts/make_screenshots.py [--out Resources/Screenshots]``.
Relative paths are used for the model and the interpreter, and the script refuses to write a
picture in which a text field shows an absolute path of this machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHANTOM = ("test", 151)  # a test-split phantom with a nodule in the left lower lobe
XRAY_PHANTOM = ("test", 3)  # a test-split radiograph phantom with a finding


def _wait(app, cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        app.processEvents()
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def _visible_texts(win) -> list[str]:
    from qtpy import QtWidgets

    out = [win.windowTitle()]
    for cls, get in ((QtWidgets.QLineEdit, "text"), (QtWidgets.QLabel, "text"),
                     (QtWidgets.QTextBrowser, "toPlainText")):
        out += [getattr(w, get)() for w in win.findChildren(cls) if w.isVisible()]
    return out


def _start(app, win, checkpoint: str, timeout: float) -> None:
    """Start a local worker on ``checkpoint`` (relative to the repository) with a relative interpreter."""
    from medmvl_core.client import controller as ctl

    python = os.path.relpath(sys.executable)
    win.pythonEdit.setText(python if not python.startswith("..") else sys.executable)
    win.checkpointEdit.setText(checkpoint)
    win.deviceCombo.setCurrentText("cpu")
    win._start()
    if not _wait(app, lambda: win.controller.state in (ctl.READY, ctl.DEAD, ctl.ERROR), timeout) \
            or win.controller.state != ctl.READY:
        raise RuntimeError(f"the demo worker did not start: {win.stateLabel.text()}")
    if python.startswith(".."):
        win.pythonEdit.setText(Path(sys.executable).name)


def _ask(app, win, task: str, question: str, timeout: float) -> None:
    win.set_task(task)
    win.questionEdit.setText(question)
    if not win.ask() or not _wait(app, win.controller.idle, timeout):
        raise RuntimeError(f"{task} failed: {win.statusLabel.text()}")


def _check_no_paths(win, tmp: Path) -> None:
    leaks = [t for t in _visible_texts(win) if str(REPO) in t or str(tmp) in t
             or os.path.expanduser("~") + "/" in t]
    if leaks:
        raise RuntimeError(f"a machine path is visible: {leaks[0][:200]!r}")


@contextlib.contextmanager
def _viewer(phantom, size: tuple[int, int], checkpoint: str, timeout: float):
    """(app, window, temp folder) with ``phantom`` written and loaded and a local worker on
    ``checkpoint`` ready; the window, worker and folder are gone afterwards."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    os.chdir(REPO)  # relative model / interpreter paths: nothing of this machine on screen
    from qtpy import QtWidgets

    from medmvl_core.data.phantoms import write_phantom
    from medmvl_core.viewer.window import ViewerWindow

    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication(sys.argv[:1])
    tmp = Path(tempfile.mkdtemp(prefix="medmvl-shots-"))
    name = write_phantom(phantom, tmp)
    win = ViewerWindow()
    win.resize(*size)
    win.show()
    try:
        win.load_path(tmp / name)
        _start(app, win, checkpoint, timeout)
        win.controller.max_new_tokens = 96
        yield app, win, tmp
    finally:
        win.close()
        win.controller.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def make_radiograph(out_dir: Path, timeout: float = 300.0) -> Path:
    """The radiograph scenario: report + find on an unseen radiograph phantom; returns the PNG."""
    from medmvl_core.data.phantom_tasks import KIND_TEXT
    from medmvl_core.data.phantoms import make_xray_phantom

    ph = make_xray_phantom(0, *XRAY_PHANTOM)
    with _viewer(ph, (1280, 760), "Resources/demo_model_2d", timeout) as (app, win, tmp):
        _ask(app, win, "report", "", timeout)
        _ask(app, win, "find", KIND_TEXT[ph.findings[0].kind], timeout)
        app.processEvents()
        _check_no_paths(win, tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        shot = out_dir / "viewer_radiograph_find.png"
        win.grab().save(str(shot))
        return shot


def make(out_dir: Path, timeout: float = 300.0) -> list[Path]:
    """Run the CT scenario and write both PNGs into ``out_dir``; returns their paths."""
    from medmvl_core.data.phantoms import make_ct_phantom

    with _viewer(make_ct_phantom(0, *PHANTOM), (1500, 900), "Resources/demo_model", timeout) as (app, win, tmp):
        for task, question in (("report", ""), ("find", "nodule")):
            _ask(app, win, task, question, timeout)
        found = [o.box for o in win.view.overlays if o.kind == "found"]
        # A region drawn around the found box with a margin, then "describe".
        f = found[0] if found else (win.view.k - 2, 38, 60, win.view.k + 3, 46, 70)
        box = (max(0, f[0] - 2), max(0, f[1] - 8), max(0, f[2] - 8), f[3] + 2, f[4] + 8, f[5] + 8)
        win.view.set_user_box(box)
        win._on_box_drawn(box)
        win.set_task("describe")
        if not win.ask() or not _wait(app, win.controller.idle, timeout):
            raise RuntimeError(f"describe failed: {win.statusLabel.text()}")
        if found:
            win.view.set_position([(found[0][a] + found[0][a + 3] - 1) // 2 for a in range(3)])
        win.wlCombo.setCurrentText("Lung")
        app.processEvents()
        _check_no_paths(win, tmp)
        out_dir.mkdir(parents=True, exist_ok=True)
        shots = [out_dir / "viewer_three_views.png", out_dir / "panel_conversation.png"]
        win.grab().save(str(shots[0]))
        win.panel.grab().save(str(shots[1]))
        return shots


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "Resources" / "Screenshots"))
    p.add_argument("--only", choices=["ct", "radiograph"], default=None, help="one scenario only")
    args = p.parse_args()
    paths = [] if args.only == "radiograph" else make(Path(args.out))
    if args.only != "ct":
        paths.append(make_radiograph(Path(args.out)))
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
