"""End-to-end self-test of the MedM-VL module inside 3D Slicer: the real panel widgets against a
local worker on the demo model. Steps: write a test phantom (in the worker's Python), load it as
a volume, start the worker from the panel, draw an ROI, ask, describe the region, find (the
answer's box becomes an ROI), save the scene as .mrb and load it back, stop the worker.

Configure with environment variables (set before starting Slicer, or in the Python console with
``os.environ[...] = ...``):

- ``MEDMVL_TEST_PYTHON``: the Python of an environment with this project and torch installed
  (required; without it the test reports itself SKIPPED, never passed),
- ``MEDMVL_TEST_CHECKPOINT``: a model folder (default: ``Resources/demo_model`` of the checkout),
- ``MEDMVL_TEST_DEVICE``: ``cpu`` (default), ``cuda`` or ``auto``.

Run it in Slicer's Python console::

    import runpy
    runpy.run_path(r"/path/to/checkout/MedMVLSlicer/Testing/Python/MedMVLSlicerSelfTest.py",
                   run_name="medmvl_selftest")["runSelfTest"]()

or from a shell: ``Slicer --python-script /path/to/.../MedMVLSlicerSelfTest.py`` (exit code 0
passed, 1 failed, 2 skipped). The extension build also registers it with ctest, where a skip
shows as "OK (skipped=1)" in the test output. See docs/slicer-install.md.
"""

import logging
import os
import subprocess
import sys
import tempfile
import time
import unittest
from pathlib import Path

import slicer

SELF = Path(os.path.abspath(globals().get("__file__") or "MedMVLSlicerSelfTest.py"))
CHECKOUT = SELF.parents[3] if len(SELF.parents) > 3 else SELF.parent


def _config():
    python = os.environ.get("MEDMVL_TEST_PYTHON", "")
    checkpoint = os.environ.get("MEDMVL_TEST_CHECKPOINT") or str(CHECKOUT / "Resources" / "demo_model")
    return python, checkpoint, os.environ.get("MEDMVL_TEST_DEVICE", "cpu")


def _wait(controller, timeout=600.0):
    """Let the panel finish its job (inline with the Qt transport, a thread otherwise) and
    dispatch its events, the application processing events meanwhile."""
    deadline = time.monotonic() + timeout
    while controller.busy():
        if time.monotonic() > deadline:
            raise AssertionError(f"the panel was still busy after {timeout:.0f} s")
        slicer.app.processEvents()
        time.sleep(0.02)
    controller.poll()
    slicer.app.processEvents()


class MedMVLSlicerSelfTest(unittest.TestCase):
    """The panel as a user drives it, against a real worker."""

    def setUp(self):
        slicer.mrmlScene.Clear()
        self.python, self.checkpoint, self.device = _config()
        if not self.python:
            self.skipTest("MEDMVL_TEST_PYTHON is not set (the Python that runs the worker); "
                          "see docs/slicer-install.md, 'Self-test inside Slicer'")
        if not os.path.isfile(os.path.join(self.checkpoint, "config.json")):
            self.skipTest(f"no model at {self.checkpoint} (set MEDMVL_TEST_CHECKPOINT)")
        self.tmp = tempfile.mkdtemp(prefix="medmvl-selftest-")

    def _phantom(self, env):
        """A test-split CT phantom written by the worker's Python (``medmvl phantoms``), loaded the
        way a user loads a file; returns (volume node, one finding with its voxel box)."""
        import json

        out = os.path.join(self.tmp, "phantom")
        done = subprocess.run([self.python, "-m", "medmvl_core.cli", "phantoms", "--out", out, "--n", "0",
                               "--n-test", "1", "--splits", "test", "--kind", "ct"],
                              capture_output=True, text=True, env=env, timeout=300)
        self.assertEqual(done.returncode, 0, done.stderr[-2000:])
        entry = json.loads(Path(out, "manifest.json").read_text())["phantoms"][0]
        volume = slicer.util.loadVolume(os.path.join(out, entry["image"]))
        self.assertIsNotNone(volume, "the phantom did not load")
        return volume, entry["findings"][0]

    def test_panel_end_to_end(self):
        slicer.util.selectModule("MedMVLSlicer")
        widget = slicer.modules.medmvlslicer.widgetRepresentation().self()
        ui, logic = widget.ui, widget.logic
        ctl = sys.modules[type(logic.controller).__module__]
        logging.info("MedM-VL self-test: transport %s", type(logic.controller.runner).__name__)

        volume, finding = self._phantom(logic.workerEnvironment())
        ui.inputSelector.setCurrentNode(volume)
        self.assertIs(ui.inputSelector.currentNode(), volume)

        # Start the worker from the panel.
        ui.localRadioButton.checked = True
        ui.pythonPathLineEdit.currentPath = self.python
        ui.checkpointPathLineEdit.currentPath = self.checkpoint
        ui.deviceComboBox.setCurrentIndex(ui.deviceComboBox.findText(self.device))
        ui.startButton.click()
        _wait(logic.controller)
        self.assertEqual(logic.controller.state, ctl.READY, logic.controller.detail)
        self.assertTrue(ui.askButton.enabled)

        def run(task, question=""):
            ui.taskComboBox.setCurrentIndex(ui.taskComboBox.findData(task))
            ui.questionLineEdit.text = question
            before = len(logic.controller.history(volume.GetID()))
            ui.askButton.click()
            _wait(logic.controller)
            entries = logic.controller.history(volume.GetID())[before:]
            self.assertEqual([e.role for e in entries], ["user", "assistant"], logic.transcript(volume))
            return entries[-1]

        # Ask.
        answer = run("ask", "Is there a cyst?")
        self.assertIn("MedM-VL: " + answer.text, ui.chatTextEdit.toPlainText())
        # Draw an ROI on the finding (as the place widget would) and describe it.
        roi = logic.createRoiFromBox(volume, finding["box"], "MedMVLSelfTest ROI")
        ui.roiSelector.setCurrentNode(roi)
        self.assertEqual(tuple(logic.roiVoxelBox(roi, volume)), tuple(finding["box"]))
        described = run("describe")
        self.assertTrue(described.text.strip())
        # Find: each distinct box of the answer becomes a named ROI, the first one selected.
        found = run("find", f"the {finding['kind']}")
        boxes = ctl.unique_voxel_boxes(found.boxes)
        rois = [n for n in slicer.util.getNodesByClass("vtkMRMLMarkupsROINode")
                if n.GetName().startswith(f"MedM-VL the {finding['kind']}")]
        self.assertEqual(len(rois), len(boxes))
        if boxes:
            self.assertIs(ui.roiSelector.currentNode(), rois[0])
        logging.info("MedM-VL self-test: find gave %s; the phantom's truth is %s", boxes, finding["box"])

        # Save the scene and load it back.
        path = os.path.join(self.tmp, "scene.mrb")
        self.assertTrue(slicer.util.saveScene(path), "saving the scene failed")
        slicer.mrmlScene.Clear()
        slicer.util.loadScene(path)
        names = [n.GetName() for n in slicer.util.getNodesByClass("vtkMRMLMarkupsROINode")]
        self.assertIn("MedMVLSelfTest ROI", names)
        self.assertEqual(len([n for n in names if n.startswith("MedM-VL the")]), len(boxes))

        # Stop.
        ui.stopButton.click()
        _wait(logic.controller)
        self.assertEqual(logic.controller.state, ctl.DISCONNECTED)

    def tearDown(self):
        widget = getattr(slicer.modules, "medmvlslicer", None)
        if widget is not None and widget.widgetRepresentation() is not None:
            w = widget.widgetRepresentation().self()
            if getattr(w, "logic", None) is not None:
                w.logic.shutdown()


def runSelfTest() -> unittest.TestResult:
    """Run the self-test and print a visible verdict (PASSED / SKIPPED: why / FAILED)."""
    suite = unittest.defaultTestLoader.loadTestsFromTestCase(MedMVLSlicerSelfTest)
    result = unittest.TextTestRunner(verbosity=2).run(suite)
    if result.skipped:
        verdict = "SKIPPED: " + "; ".join(reason for _, reason in result.skipped)
    else:
        verdict = "PASSED" if result.wasSuccessful() else "FAILED (see the console)"
    print(f"MedM-VL self-test {verdict}")
    slicer.util.showStatusMessage(f"MedM-VL self-test {verdict}", 10000)
    return result


if __name__ == "__main__":
    outcome = runSelfTest()
    slicer.util.exit(1 if not outcome.wasSuccessful() else 2 if outcome.skipped else 0)
