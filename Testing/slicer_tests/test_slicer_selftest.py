"""The in-Slicer self-test (MedMVLSlicer/Testing/Python/MedMVLSlicerSelfTest.py) run outside
Slicer on the stubs (real MRML from slicer-core, widgets from the real .ui, Qt networking from
PySide6): unconfigured it reports SKIPPED, configured it drives the panel end to end against a
real worker on the demo model. What only Slicer can show (real widgets, .mrb bundles, PythonQt)
is listed in docs/slicer-install.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("slicer", reason="slicer-core is installed by `make test`")
pytest.importorskip("qtpy.QtNetwork", reason="the viewer extra (qtpy + PySide6) is needed")

TESTING = Path(__file__).resolve().parents[1]
REPO = TESTING.parent
SELFTEST = REPO / "MedMVLSlicer" / "Testing" / "Python" / "MedMVLSlicerSelfTest.py"

RUN = ("import os, runpy, sys; sys.path.insert(0, %r)\n"
       "from qtpy import QtCore; app = QtCore.QCoreApplication([])\n"
       "import slicer_stubs; rec = slicer_stubs.install()\n"
       "result = runpy.run_path(%r, run_name='medmvl_selftest')['runSelfTest']()\n"
       "print('RESULT', len(result.skipped), len(result.failures), len(result.errors), result.testsRun)\n"
       "print('STATUS', rec.displayed[-1])\n"
       "os._exit(0)\n" % (str(TESTING), str(SELFTEST)))


def _run(**env_vars: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDMVL_TEST_")}
    env.update(env_vars, PYTHONPATH=str(REPO), QT_QPA_PLATFORM="offscreen")
    return subprocess.run([sys.executable, "-c", RUN], capture_output=True, text=True,
                          timeout=600, env=env, cwd=str(REPO))


def test_unconfigured_self_test_says_skipped_not_passed():
    out = _run()
    assert out.returncode == 0, out.stderr[-3000:]
    assert "RESULT 1 0 0 1" in out.stdout, out.stdout + out.stderr[-3000:]
    assert "STATUS MedM-VL self-test SKIPPED: MEDMVL_TEST_PYTHON is not set" in out.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the GIL-holding harness is Linux-only")
def test_self_test_drives_the_panel_against_the_demo_worker_while_the_gil_is_held():
    """Start, ask, describe, find, save/load, stop through the panel, against a real worker on
    the demo model, in an event loop whose main thread keeps the GIL between events."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDMVL_TEST_")}
    env.update(MEDMVL_TEST_PYTHON=sys.executable, QT_QPA_PLATFORM="offscreen",
               PYTHONPATH=os.pathsep.join([str(REPO), str(TESTING)]))
    out = subprocess.run([sys.executable, str(TESTING / "qt_gil_harness.py"), "selftest", "-", "-"],
                         capture_output=True, text=True, timeout=600, env=env, cwd=str(REPO))
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert "error" not in got, got["error"]
    assert got["problems"] == [] and (got["run"], got["skipped"]) == (1, 0), got
    assert got["status"] == "MedM-VL self-test PASSED" and got["runner"] == "QtRunner"
    assert "You: Find: the " in got["chat"] and "MedM-VL: " in got["chat"]
