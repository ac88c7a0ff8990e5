"""DICOM reading with pydicom: series folders, single files, enhanced multi-frame, radiographs.

Series are grouped by SeriesInstanceUID and sorted along the slice normal; stored values are
rescaled to HU (slope/intercept per slice). Radiographs get the modality LUT, the VOI LUT or
window, and MONOCHROME1 inversion, then become uint8. SimpleITK (GDCM) is the fallback for
compressed series pydicom cannot decode.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from medmvl_core.errors import ImageReadError, InvalidImageError
from medmvl_core.imaging.volume import Volume

logger = logging.getLogger(__name__)

RADIOGRAPH_MODALITIES = {"CR", "DX", "MG", "RG", "RF", "XA", "IO", "PX", "OT", "SC", "US", "ES", "XC", "GM"}
NON_IMAGE_SOP = {
    "1.2.840.10008.5.1.4.1.1.66.4": "a segmentation (SEG)",
    "1.2.840.10008.5.1.4.1.1.481.3": "an RT structure set",
    "1.2.840.10008.5.1.4.1.1.66": "raw data",
    "1.2.840.10008.5.1.4.1.1.104.1": "an encapsulated PDF",
    "1.2.840.10008.5.1.4.1.1.11.1": "a presentation state",
}


def _sop_kind(sop: str) -> str | None:
    if sop in NON_IMAGE_SOP:
        return NON_IMAGE_SOP[sop]
    if sop.startswith("1.2.840.10008.5.1.4.1.1.88."):
        return "a structured report (SR)"
    if sop.startswith("1.2.840.10008.5.1.4.1.1.481."):
        return "an RT object"
    return None


def _first_line(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1][:200] if lines else type(exc).__name__


def _dcmread(p: Path, **kw):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(str(p), **kw)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError) as exc:
        raise ImageReadError(f"cannot read {p.name} as DICOM ({_first_line(exc)}); the file may be "
                             "truncated or not DICOM") from exc


def _check_is_image(ds, name: str) -> None:
    kind = _sop_kind(str(ds.get("SOPClassUID", "")))
    if kind or ds.get("Modality") in ("SR", "SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "PR", "KO", "DOC"):
        what = kind or f"a {ds.get('Modality')} object"
        raise InvalidImageError(f"{name} is {what}, not an image; select the image series it refers to")
    has_pixels = any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
    if not has_pixels and "Rows" not in ds:  # headers read with stop_before_pixels keep Rows
        raise InvalidImageError(f"{name} holds no pixel data; select an image file or series")


def _pixels(ds, name: str) -> np.ndarray:
    try:
        return ds.pixel_array
    except Exception as exc:  # pydicom raises many types for truncated/compressed data
        raise ImageReadError(f"cannot decode the pixels of {name} ({_first_line(exc)}); the file may "
                             "be truncated or use a compression without an installed decoder") from exc


def read_dicom_file(p: Path) -> Volume:
    """One DICOM file: enhanced multi-frame CT/MR -> 3D; radiographs -> 2D uint8; a slice -> [1, H, W]."""
    ds = _dcmread(p)
    _check_is_image(ds, p.name)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    modality = str(ds.get("Modality", "unknown"))
    if frames > 1 and "PerFrameFunctionalGroupsSequence" in ds:
        return _read_multiframe(ds, p.name)
    if frames > 1:
        raise InvalidImageError(f"{p.name}: a multi-frame {modality} without per-frame geometry "
                                "(e.g. a cine loop) is not supported")
    if modality in RADIOGRAPH_MODALITIES or int(ds.get("SamplesPerPixel", 1)) == 3:
        return _read_radiograph(ds, p.name)
    return _read_slice(ds, p.name)


def _lut_functions():
    """pydicom's modality and VOI LUT functions (pydicom >= 3: ``pydicom.pixels``; 2.x: the handlers util)."""
    try:
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut
    return apply_modality_lut, apply_voi_lut


def _read_slice(ds, name: str) -> Volume:
    apply_modality_lut, _ = _lut_functions()
    arr = apply_modality_lut(_pixels(ds, name), ds)
    ps = [float(v) for v in ds.get("PixelSpacing", [1.0, 1.0])]
    thick = float(ds.get("SliceThickness", 1.0) or 1.0)
    direction, origin = _plane_geometry(ds.get("ImageOrientationPatient"), ds.get("ImagePositionPatient"))
    return Volume(np.asarray(arr)[None], (ps[1], ps[0], thick), origin, direction,
                  str(ds.get("Modality", "unknown")), "dicom-file")


def _plane_geometry(iop, ipp):
    if iop is None:
        return np.eye(3), (0.0, 0.0, 0.0)
    row = np.array([float(v) for v in iop[:3]])
    col = np.array([float(v) for v in iop[3:]])
    normal = np.cross(row, col)
    direction = np.stack([row, col, normal], axis=1)
    origin = tuple(float(v) for v in ipp) if ipp is not None else (0.0, 0.0, 0.0)
    return direction, origin


def _read_radiograph(ds, name: str) -> Volume:
    """Modality LUT, VOI LUT or window, MONOCHROME1 inversion -> uint8 [1, H, W] (or RGB)."""
    apply_modality_lut, apply_voi_lut = _lut_functions()
    arr = _pixels(ds, name)
    spacing = _radiograph_spacing(ds, name)
    if arr.ndim == 3 and arr.shape[-1] == 3:
        rgb = arr if arr.dtype == np.uint8 else _to_u8(arr, float(arr.min()), float(arr.max()))
        return Volume(rgb[None], spacing, modality="XR", source="dicom-radiograph")
    has_voi = "VOILUTSequence" in ds or "WindowCenter" in ds
    values = apply_modality_lut(arr, ds).astype(np.float64)
    if has_voi:
        lo, hi = _voi_range(ds, values)
        values = np.asarray(apply_voi_lut(values, ds, index=0), dtype=np.float64)
    else:
        lo, hi = float(values.min()), float(values.max())
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        values = hi + lo - values  # display convention: high values dark -> invert
    u8 = _to_u8(values, lo, hi)
    return Volume(u8[None], spacing, modality="XR", source="dicom-radiograph")


def _radiograph_spacing(ds, name: str) -> tuple[float, float, float]:
    """(column, row, 1) spacing in mm: PixelSpacing, else ImagerPixelSpacing (at the detector), else 1 mm.
    A value that is not two positive numbers is skipped (real CR files carry ``PixelSpacing`` 0\\0,
    e.g. pydicom-data's RG1_UNCR.dcm), so such a radiograph still opens; its mm are then pixels."""
    for key in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            ps = [float(v) for v in (ds.get(key) or [])]
        except (TypeError, ValueError):
            continue
        if len(ps) == 2 and all(np.isfinite(v) and v > 0 for v in ps):
            return (ps[1], ps[0], 1.0)
        if key in ds:
            logger.info("%s: %s %s is not a usable pixel spacing; ignored", name, key, ds.get(key))
    logger.info("%s: no pixel spacing; 1 mm per pixel assumed", name)
    return (1.0, 1.0, 1.0)


def _voi_range(ds, values: np.ndarray) -> tuple[float, float]:
    """Output range of pydicom's VOI step: the LUT's bit depth, or the window's y range."""
    if "VOILUTSequence" in ds:
        desc = ds.VOILUTSequence[0].LUTDescriptor
        return 0.0, float(2 ** int(desc[2]) - 1)
    bits = int(ds.get("BitsStored", 16))
    if int(ds.get("PixelRepresentation", 0)) == 0:
        lo, hi = 0.0, float(2 ** bits - 1)
    else:
        lo, hi = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        s, b = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        lo, hi = sorted((lo * s + b, hi * s + b))
    return lo, hi


def _to_u8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros(values.shape, np.uint8)
    return np.clip(np.round((values - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)


def _read_multiframe(ds, name: str) -> Volume:
    """Enhanced CT/MR: frames sorted along the slice normal, per-frame rescale to HU."""
    arr = np.asarray(_pixels(ds, name))
    shared = ds.get("SharedFunctionalGroupsSequence", [None])[0]
    per = ds.PerFrameFunctionalGroupsSequence

    def group(i, key):
        for g in (per[i], shared):
            if g is not None and key in g:
                return g[key][0]
        return None

    pos, slopes, intercepts = [], [], []
    iop = group(0, "PlaneOrientationSequence")
    measures = group(0, "PixelMeasuresSequence")
    if iop is None or measures is None:
        raise InvalidImageError(f"{name}: multi-frame DICOM without plane orientation/pixel spacing")
    direction, _ = _plane_geometry(iop.ImageOrientationPatient, None)
    for i in range(arr.shape[0]):
        pp = group(i, "PlanePositionSequence")
        if pp is None:
            raise InvalidImageError(f"{name}: frame {i} has no position; cannot build a volume")
        pos.append([float(v) for v in pp.ImagePositionPatient])
        pvt = group(i, "PixelValueTransformationSequence")
        slopes.append(float(getattr(pvt, "RescaleSlope", 1.0)) if pvt is not None else 1.0)
        intercepts.append(float(getattr(pvt, "RescaleIntercept", 0.0)) if pvt is not None else 0.0)
    pos = np.array(pos)
    dist = pos @ direction[:, 2]
    order = np.argsort(dist, kind="stable")
    if len(np.unique(np.round(dist, 4))) != len(dist):
        raise InvalidImageError(f"{name}: several frames share a position (multi-volume/4D data); "
                                "split it into 3D volumes first")
    data = arr[order].astype(np.float64) * np.array(slopes)[order, None, None] + \
        np.array(intercepts)[order, None, None]
    if np.all(np.equal(np.mod(data, 1), 0)) and data.min() >= -32768 and data.max() <= 32767:
        data = data.astype(np.int16)
    else:
        data = data.astype(np.float32)
    ps = [float(v) for v in measures.PixelSpacing]
    steps = np.diff(dist[order])
    dz = float(np.median(steps)) if len(steps) else float(getattr(measures, "SliceThickness", 1.0) or 1.0)
    return Volume(data, (ps[1], ps[0], dz), tuple(pos[order[0]]), direction,
                  str(ds.get("Modality", "unknown")), "dicom-multiframe")


def _scan_folder(folder: Path) -> dict[str, list]:
    """Every DICOM file under ``folder`` (read once, pixels included) grouped by SeriesInstanceUID."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    groups: dict[str, list] = {}
    for f in sorted(e for e in folder.rglob("*") if e.is_file()):  # exports often nest folders
        try:
            ds = pydicom.dcmread(str(f))
        except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError):
            logger.debug("skipping a non-DICOM file in the series folder")
            continue
        if "SeriesInstanceUID" not in ds:
            continue  # DICOMDIR and other non-instance files
        groups.setdefault(str(ds.SeriesInstanceUID), []).append((f, ds))
    return groups


def _series_info(uid: str, items: list) -> dict:
    ds = items[0][1]
    kind = _sop_kind(str(ds.get("SOPClassUID", "")))
    is_image = kind is None and str(ds.get("Modality", "")) not in ("SR", "SEG", "PR", "KO", "RTSTRUCT") \
        and "Rows" in ds
    return {"uid": uid, "files": len(items), "modality": str(ds.get("Modality", "unknown")),
            "is_image": bool(is_image)}


def list_series(folder: str | os.PathLike) -> list[dict]:
    """The DICOM series in a folder: ``[{"uid", "files", "modality", "is_image"}]``, largest first."""
    groups = _scan_folder(Path(folder))
    out = [_series_info(uid, items) for uid, items in groups.items()]
    out.sort(key=lambda s: -s["files"])
    return out


def read_dicom_folder(folder: Path, series_uid: str | None = None) -> Volume:
    """A DICOM series from a folder (HU, sorted by position). Several series: ``series_uid`` or the largest."""
    folder = Path(folder)
    if not any(e.is_file() for e in folder.rglob("*")):
        raise ImageReadError(f"the folder {folder} is empty; select the folder that contains the DICOM files")
    groups = _scan_folder(folder)
    if not groups:
        raise ImageReadError(f"no DICOM files found in {folder}; select a folder of DICOM image files")
    series = sorted((_series_info(u, it) for u, it in groups.items()), key=lambda s: -s["files"])
    if series_uid is not None:
        if series_uid not in groups:
            raise InvalidImageError(f"series {series_uid} is not in {folder}; available: "
                                    f"{[(s['uid'], s['files'], s['modality']) for s in series]}")
        uid = series_uid
    else:
        images = [s for s in series if s["is_image"]]
        if not images:
            _check_is_image(groups[series[0]["uid"]][0][1], groups[series[0]["uid"]][0][0].name)
            raise InvalidImageError(f"{folder} contains no image series; select an image series")
        if len(images) > 1:
            logger.info("%d image series in the folder: %s", len(images), images)
            if images[0]["files"] == images[1]["files"]:
                raise InvalidImageError(
                    f"{folder} holds several image series of the same size: "
                    f"{[(s['uid'], s['files'], s['modality']) for s in images]}; pick one with "
                    "series_uid (--series-uid) or put each series in its own folder")
            logger.info("picked the largest series (%d files)", images[0]["files"])
        uid = images[0]["uid"]
    items = groups[uid]
    _check_is_image(items[0][1], items[0][0].name)
    if len(items) == 1:
        return read_dicom_file(items[0][0])
    return _assemble_series(items)


def _assemble_series(items: list) -> Volume:
    """Sort slices along the normal, check they form one volume, rescale to HU."""
    first = items[0][1]
    keys = {(int(ds.get("Rows", 0)), int(ds.get("Columns", 0)),
             tuple(round(float(v), 3) for v in ds.get("ImageOrientationPatient", [])))
            for _, ds in items}
    if len(keys) > 1:
        raise InvalidImageError("the series mixes slice sizes or orientations (e.g. a scout with the "
                                "axial slices); export the axial series on its own")
    if any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for _, ds in items):
        raise InvalidImageError("the series mixes multi-frame files with slices; read one file at a time")
    direction, _ = _plane_geometry(first.get("ImageOrientationPatient"), None)
    if "ImagePositionPatient" in first:
        dist = np.array([np.asarray([float(v) for v in ds.ImagePositionPatient]) @ direction[:, 2]
                         for _, ds in items])
    else:
        dist = np.array([float(ds.get("InstanceNumber", i)) for i, (_, ds) in enumerate(items)])
    order = np.argsort(dist, kind="stable")
    steps = np.diff(dist[order])
    if np.any(np.abs(steps) < 1e-4):
        raise InvalidImageError("several slices of the series share a position (several acquisitions, "
                                "time points or echoes); split them into separate series")
    if len(steps) and (steps.max() - steps.min()) > 0.01 * max(abs(float(np.median(steps))), 1e-6) + 1e-3:
        logger.warning("the slice spacing is irregular (%.3f..%.3f mm); using the median", steps.min(), steps.max())
    sorted_items = [items[i] for i in order]
    slopes = np.array([float(ds.get("RescaleSlope", 1) or 1) for _, ds in sorted_items])
    inters = np.array([float(ds.get("RescaleIntercept", 0) or 0) for _, ds in sorted_items])
    rows, cols = int(first.Rows), int(first.Columns)
    integral = bool(np.all(slopes == 1) and np.all(inters == np.round(inters)))
    out_dtype = np.float32
    if integral:
        bits = int(first.get("BitsStored", 16))
        lo, hi = (0, 2 ** bits - 1) if int(first.get("PixelRepresentation", 0)) == 0 else \
            (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        fits = lo + inters.min() >= -32768 and hi + inters.max() <= 32767
        out_dtype = np.int16 if fits else np.int32
    out = np.empty((len(items), rows, cols), out_dtype)
    try:
        for k, (f, ds) in enumerate(sorted_items):
            a = _fast_pixels(ds)
            if a is None:
                a = ds.pixel_array
            if integral:
                np.add(a, np.int32(inters[k]), out=out[k], casting="unsafe")
            else:
                out[k] = a * slopes[k] + inters[k]
    except Exception as exc:  # decoding failed: truncated file or missing codec -> try GDCM
        logger.info("pydicom could not decode the series (%s); trying SimpleITK", _first_line(exc))
        out = _read_series_sitk([str(f) for f, _ in sorted_items])
    ps = [float(v) for v in first.get("PixelSpacing", [1.0, 1.0])]
    dz = float(np.median(steps)) if len(steps) else float(first.get("SliceThickness", 1.0) or 1.0)
    ipp = sorted_items[0][1].get("ImagePositionPatient")
    origin = tuple(float(v) for v in ipp) if ipp is not None else (0.0, 0.0, 0.0)
    return Volume(out, (ps[1], ps[0], abs(dz) or 1.0), origin, direction,
                  str(first.get("Modality", "unknown")), "dicom-series")


_NATIVE_LE = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")


def _fast_pixels(ds) -> np.ndarray | None:
    """Uncompressed little-endian 16-bit grey pixels straight from pydicom's bytes (no copy), else None."""
    ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", ""))
    if ts not in _NATIVE_LE or int(ds.get("BitsAllocated", 0)) != 16 or int(ds.get("SamplesPerPixel", 1)) != 1:
        return None
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    if signed and int(ds.get("BitsStored", 16)) != 16:
        return None  # needs sign extension: let pydicom do it
    rows, cols = int(ds.Rows), int(ds.Columns)
    data = ds.PixelData
    if len(data) < rows * cols * 2:
        raise ImageReadError("a DICOM file of the series has truncated pixel data; re-export the series")
    return np.frombuffer(data, "<i2" if signed else "<u2", count=rows * cols).reshape(rows, cols)


def _read_series_sitk(files: list[str]) -> np.ndarray:
    """GDCM fallback for compressed series pydicom cannot decode (HU via SimpleITK)."""
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        return sitk.GetArrayFromImage(reader.Execute())
    except RuntimeError as exc:
        raise ImageReadError(f"cannot read the DICOM series ({_first_line(exc)}); a file may be "
                             "truncated or corrupt") from exc
