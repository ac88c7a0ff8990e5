"""Build-time entry of the module's self test (run by ctest inside Slicer)."""

import unittest

from MedMVLSlicer import MedMVLSlicerTest


class MedMVLSlicerModuleTest(unittest.TestCase):
    def test_module(self):
        test = MedMVLSlicerTest()
        test.runTest()


if __name__ == "__main__":
    unittest.main()
