"""`medmvl viewer FILE --screenshot PNG` offscreen: the command opens a 2D image and a volume
through medmvl_core.imaging and writes a non-blank window capture; display helpers."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from medmvl_core.viewer.display import WL_PRESETS, auto_window, drag_to_voxel_box, to_display

pytest.importorskip("qtpy.QtWidgets")


@pytest.mark.parametrize("name", ["cxr.png"])
def test_viewer_command_writes_a_screenshot(reference_dir, tmp_path, name):
    out = tmp_path / "shot.png"
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen")
    proc = subprocess.run([sys.executable, "-m", "medmvl_core.cli", "viewer",
                           str(reference_dir / "inputs" / name), "--screenshot", str(out)],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from PIL import Image

    img = np.asarray(Image.open(out).convert("L"), dtype=float)
    assert img.shape[0] > 300 and img.shape[1] > 600
    view = img[40:600, 20:600]  # the slice area
    assert view.std() > 10, "the image area is blank"


def test_viewer_command_reports_a_bad_file(tmp_path):
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen")
    bad = tmp_path / "x.png"
    bad.write_bytes(b"not an image")
    proc = subprocess.run([sys.executable, "-m", "medmvl_core.cli", "viewer", str(bad),
                           "--screenshot", str(tmp_path / "s.png")],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 1 and proc.stderr.startswith("error: ")
    assert "cannot read x.png as an image" in proc.stderr and "not an image" in proc.stderr
    assert "Traceback" not in proc.stderr
    # an unreadable --token-file is a typed error too, not a traceback
    proc = subprocess.run([sys.executable, "-m", "medmvl_core.cli", "viewer", "--url", "http://127.0.0.1:1",
                           "--token-file", str(tmp_path / "no_token"), "--screenshot", str(tmp_path / "s.png")],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 1 and "--token-file" in proc.stderr and "MEDMVL_TOKEN" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_window_level_and_drag_helpers():
    s = np.array([[-1000, -600], [150, 1000]], dtype=np.int16)
    lung = to_display(s, *WL_PRESETS["Lung"])
    assert lung.shape == (2, 2, 3) and lung.dtype == np.uint8
    # window 1500 centred on -600: -1350 -> 0, +150 -> 255, -600 -> mid grey
    assert lung[0, 0, 0] == round((-1000 + 1350) / 1500 * 255) and lung[1, 0, 0] == 255
    assert lung[0, 1, 0] == 128
    rgb = np.full((2, 2, 3), 7, np.uint8)
    assert (to_display(rgb) == 7).all()
    w, l = auto_window(np.arange(101.0))
    assert (w, l) == pytest.approx((98.0, 50.0))
    with pytest.raises(ValueError, match="slice"):
        to_display(np.zeros(5))
    assert drag_to_voxel_box((5.5, 9.0), (1.2, 2.5), k=3, depth=1, shape=(5, 10, 8)) == (2, 2, 1, 5, 9, 6)
    assert drag_to_voxel_box((3.0, 3.0), (3.0, 3.0), k=0, depth=0, shape=(1, 10, 8)) == (0, 3, 3, 1, 4, 4)
