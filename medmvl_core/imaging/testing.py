"""Synthetic DICOM writers shared by the tests and the benchmarks (not used at run time).

Importing this module imports pydicom; nothing in the runtime path imports it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def write_ct_slice(path: str | Path, hu: np.ndarray, *, position: Sequence[float],
                   iop: Sequence[float] = (1, 0, 0, 0, 1, 0), spacing: Sequence[float] = (1.0, 1.0, 1.0),
                   series_uid: str, study_uid: str = "1.2.3", instance: int = 1,
                   slope: float = 1.0, intercept: float = -1024.0, bits_stored: int = 16,
                   frame_uid: str | None = None) -> None:
    """Write one single-frame CT image file.

    hu: [rows, columns] HU values; stored as uint16 ``round((hu - intercept) / slope)`` (the caller
    keeps values inside the uint16 / ``bits_stored`` range). spacing: (x, y, z) in mm — column
    spacing, row spacing, slice thickness. position: ImagePositionPatient (LPS, mm).
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = "CT", series_uid, study_uid
    if frame_uid is not None:
        ds.FrameOfReferenceUID = frame_uid
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [float(v) for v in position]
    ds.ImageOrientationPatient = [float(v) for v in iop]
    ds.PixelSpacing = [spacing[1], spacing[0]]
    ds.SliceThickness = spacing[2]
    ds.Rows, ds.Columns = hu.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    ds.RescaleIntercept, ds.RescaleSlope = intercept, slope
    ds.PixelData = np.round((hu - intercept) / slope).astype(np.uint16).tobytes()
    ds.save_as(Path(path), enforce_file_format=True)


def write_ct_series(folder: str | Path, hu: np.ndarray, *, spacing: Sequence[float] = (0.7, 0.8, 2.5),
                    origin: Sequence[float] = (-10.0, 20.0, 30.0), iop: Sequence[float] = (1, 0, 0, 0, 1, 0),
                    uid: str | None = None, slope: float = 1.0, intercept: float = -1024.0,
                    shuffle_names: bool = True, rows_override: int | None = None) -> str:
    """Write hu [K, J, I] as single-frame CT files ``im###.dcm``; return the series UID.

    Slice k sits at ``origin + k * spacing[2] * normal``. shuffle_names: file names in a seeded
    random order, so readers must sort by position. rows_override: truncate every slice but the
    first to that many rows (a series that mixes slice sizes).
    """
    from pydicom.uid import generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    uid = uid or generate_uid()
    normal = np.cross(np.array(iop[:3], float), np.array(iop[3:], float))
    names = np.random.default_rng(0).permutation(len(hu)) if shuffle_names else range(len(hu))
    for k, name in zip(range(len(hu)), names):
        sl = hu[k] if rows_override is None or k == 0 else hu[k][:rows_override]
        write_ct_slice(folder / f"im{name:03d}.dcm", sl, position=np.array(origin) + k * spacing[2] * normal,
                       iop=iop, spacing=spacing, series_uid=uid, instance=k + 1, slope=slope, intercept=intercept)
    return uid
