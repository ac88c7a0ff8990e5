"""Screenshot of the viewer finding a box on a radiograph: Resources/Screenshots/viewer_radiograph_find.png.

The real viewer window, offscreen, starts a real local worker on the radiograph demo model
(Resources/demo_model_2d), opens an unseen test phantom radiograph (PNG), asks "find" for one of its
findings and waits for the box to be drawn; then the window is grabbed. Run from the repository root:

    QT_QPA_PLATFORM=offscreen python scripts/screenshot_radiograph.py [--out FILE] [--index N]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "Resources" / "Screenshots" / "viewer_radiograph_find.png"))
    parser.add_argument("--checkpoint", default=str(REPO / "Resources" / "demo_model_2d"))
    parser.add_argument("--index", type=int, default=3, help="test-split phantom index (one with a finding)")
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from qtpy import QtWidgets

    from medmvl_core.client import controller as ctl
    from medmvl_core.data.phantom_tasks import KIND_TEXT
    from medmvl_core.data.phantoms import make_xray_phantom, write_phantom
    from medmvl_core.viewer.window import ViewerWindow

    ph = make_xray_phantom(0, "test", args.index)
    if not ph.findings:
        print(f"test phantom {args.index} has no finding; pick another --index", file=sys.stderr)
        return 1
    app = QtWidgets.QApplication.instance() or QtWidgets.QApplication([])
    win = ViewerWindow()
    win.resize(1280, 760)
    win.show()

    def wait(pred, timeout: float) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            app.processEvents()
            if pred():
                return True
            time.sleep(0.05)
        return False

    try:
        with tempfile.TemporaryDirectory() as tmp:
            png = Path(tmp) / write_phantom(ph, Path(tmp))
            win.load_path(png)
            win.checkpointEdit.setText(args.checkpoint)
            win.deviceCombo.setCurrentText("cpu")
            win._start()
            if not wait(lambda: win.controller.state == ctl.READY, args.timeout):
                print(f"the worker did not start: {win.controller.state} {win.controller.detail}", file=sys.stderr)
                return 1
            win.set_task("find")
            win.questionEdit.setText(KIND_TEXT[ph.findings[0].kind])
            if not win.ask() or not wait(lambda: win.controller.idle and win.controller.state == ctl.READY, 120):
                print(f"the question failed: {win.statusLabel.text()}", file=sys.stderr)
                return 1
            found = [o for o in win.view.overlays if o.kind == "found"]
            print(f"{ph.id}: truth {ph.findings[0].kind} at pixels {list(ph.findings[0].box)}; "
                  f"found {[o.box for o in found]}")
            app.processEvents()
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            win.grab().save(args.out)
            print(f"wrote {args.out}")
    finally:
        win.controller.shutdown()
        win.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
