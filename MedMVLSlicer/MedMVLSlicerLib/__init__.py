"""Slicer-side helpers of the MedMVLSlicer module (MRML node geometry). VTK + numpy only."""
