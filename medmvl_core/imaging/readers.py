"""Readers: every common medical image format into a :class:`Volume`.

Chosen by content first (a DICOM preamble, a folder), then by extension:

=====================  ===========================================================
folder                 DICOM series (pydicom, GDCM fallback; several series: the one named by
                       ``series_uid``, else the largest; multi-frame files via pydicom)
``.dcm`` / DICOM file  multi-frame enhanced CT/MR -> 3D; CR/DX/MG/... radiographs and
                       secondary captures -> 2D uint8 (modality LUT, VOI LUT/window,
                       MONOCHROME1 inverted); a single CT/MR slice -> a 1-slice volume
``.nii`` ``.nii.gz``   SimpleITK (LPS geometry)
``.nrrd`` ``.nhdr``    SimpleITK
``.mha`` ``.mhd``      SimpleITK
``.npy``               MedM-VL's data: a [D, H, W] HU array (or [1, D, H, W]); no geometry,
                       so spacing 1 mm, origin 0, identity direction (LPS axes)
``.png`` ``.jpg``      Pillow: 8-bit grey -> [1, H, W] uint8, colour -> [1, H, W, 3] uint8
``.bmp`` ``.tif``      (as ``convert("RGB")``), 16-bit / float kept as is -> [1, H, W]; no pixel
                       size is read (spacing 1); CMYK and 12-bit / lossless JPEG are refused
=====================  ===========================================================
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from medmvl_core.errors import ImageReadError, InvalidImageError
from medmvl_core.imaging.dicom import list_series, read_dicom_file, read_dicom_folder
from medmvl_core.imaging.volume import Volume

__all__ = ["list_series", "read_dicom_file", "read_dicom_folder", "read_image"]

ITK_EXTS = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
PIL_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def read_image(path: str | os.PathLike, series_uid: str | None = None) -> Volume:
    """Read any supported image (file or DICOM folder) into a :class:`Volume`.

    Raises:
        ImageReadError: missing, unreadable or truncated files, unknown formats, empty folders.
        InvalidImageError: files that are not images (DICOM SR/SEG), 4D data, ambiguous series.
    """
    p = Path(path)
    if not p.exists():
        raise ImageReadError(f"{p} does not exist; check the path")
    if p.is_dir():
        return read_dicom_folder(p, series_uid)
    name = p.name.lower()
    if _is_dicom_file(p) or name.endswith(".dcm"):
        return read_dicom_file(p)
    if name.endswith(".npy"):
        return read_npy(p)
    if name.endswith(ITK_EXTS):
        return read_itk(p)
    if name.endswith(PIL_EXTS):
        return read_2d(p)
    raise ImageReadError(
        f"{p.name}: unknown image format; supported: DICOM files or folders, "
        f"{', '.join(ITK_EXTS + PIL_EXTS)}, .npy")


def _is_dicom_file(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            head = f.read(132)
    except OSError as exc:
        raise ImageReadError(f"cannot open {p}: {exc}") from exc
    return len(head) == 132 and head[128:132] == b"DICM"


# --------------------------------------------------------------------------- npy
def read_npy(p: Path) -> Volume:
    """A MedM-VL ``.npy`` (HU [D, H, W], or [1, D, H, W] v1.0 data) with identity geometry."""
    try:
        arr = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ImageReadError(f"{p.name} is not a readable .npy array ({exc}); re-save it with numpy.save") from exc
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 2:
        return Volume(arr[None], modality="image", source="npy")
    if arr.ndim != 3:
        raise InvalidImageError(f"{p.name}: expected a [D, H, W] array, got shape {arr.shape}; "
                                "4D data must be split into 3D volumes")
    return Volume(arr, modality="CT", source="npy")


# --------------------------------------------------------------------------- ITK formats
def _sitk_to_volume(img, source: str, modality: str = "unknown") -> Volume:
    import SimpleITK as sitk

    if img.GetDimension() == 2:
        arr = sitk.GetArrayFromImage(img)[None]
        sp = tuple(img.GetSpacing()) + (1.0,)
        org = tuple(img.GetOrigin()) + (0.0,)
        d2 = np.array(img.GetDirection()).reshape(2, 2)
        direction = np.eye(3)
        direction[:2, :2] = d2
    elif img.GetDimension() == 3:
        arr = sitk.GetArrayFromImage(img)
        sp, org = img.GetSpacing(), img.GetOrigin()
        direction = np.array(img.GetDirection()).reshape(3, 3)
    else:
        raise InvalidImageError(f"{img.GetDimension()}D data is not supported; split it into 3D volumes")
    if img.GetNumberOfComponentsPerPixel() > 1:
        if arr.shape[0] == 1 and arr.shape[-1] == 3:
            return Volume(arr.astype(np.uint8), sp, org, direction, "image", source)
        raise InvalidImageError(
            f"the image has {img.GetNumberOfComponentsPerPixel()} components per voxel (vector or "
            "4D data); extract a single scalar 3D volume first")
    return Volume(arr, sp, org, direction, modality, source)


def read_itk(p: Path) -> Volume:
    """NIfTI / NRRD / MetaImage via SimpleITK (geometry in LPS)."""
    import SimpleITK as sitk

    kind = _itk_kind(p.name.lower())
    if kind == "nifti":
        _check_nifti_complete(p)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        reader.ReadImageInformation()
        dim = reader.GetDimension()
        size = reader.GetSize()
        if dim == 4 and size[3] == 1:
            reader.SetExtractIndex([0, 0, 0, 0])
            reader.SetExtractSize([size[0], size[1], size[2], 0])
        elif dim > 3:
            raise InvalidImageError(
                f"{p.name} is {dim}D (size {size}); only 3D volumes and 2D images are supported — "
                "extract one 3D volume (e.g. one time point) first")
        img = reader.Execute()
    except RuntimeError as exc:
        raise ImageReadError(f"cannot read {p.name} as {kind}: {_first_line(exc)}; "
                             "the file may be truncated or corrupt") from exc
    return _sitk_to_volume(img, kind)


def _check_nifti_complete(p: Path) -> None:
    """ITK zero-fills truncated NIfTI data silently; check the size (.nii) or the gzip stream (.nii.gz)."""
    import gzip
    import zlib

    import nibabel as nib

    try:
        if p.name.lower().endswith(".gz"):
            with gzip.open(p, "rb") as f:
                while f.read(1 << 24):
                    pass
            return
        hdr = nib.Nifti1Image.from_filename(str(p)).header
    except (EOFError, OSError, zlib.error, nib.filebasedimages.ImageFileError, ValueError) as exc:
        raise ImageReadError(f"cannot read {p.name} as NIfTI ({exc}); the file may be truncated or corrupt") from exc
    need = int(hdr.get_data_offset()) + int(np.prod(hdr.get_data_shape())) * hdr.get_data_dtype().itemsize
    if p.stat().st_size < need:
        raise ImageReadError(f"{p.name} is truncated ({p.stat().st_size} of {need} bytes); re-export the file")


def _itk_kind(name: str) -> str:
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith((".nrrd", ".nhdr")):
        return "nrrd"
    return "metaimage"


def _first_line(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1][:200] if lines else type(exc).__name__


# --------------------------------------------------------------------------- 2D
def read_2d(p: Path) -> Volume:
    """PNG/JPEG/BMP/TIFF via Pillow. 8-bit -> uint8 (colour as ``convert("RGB")``); 16-bit kept."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(p) as im:
            if getattr(im, "n_frames", 1) > 1:
                raise InvalidImageError(
                    f"{p.name} has {im.n_frames} pages/frames; multi-page images are not supported — "
                    "save the volume as NIfTI or a DICOM series")
            im.load()
            mode = im.mode
            if mode == "CMYK":
                # print separations: without the file's colour profile the grey levels are a guess
                raise InvalidImageError(
                    f"{p.name} is a CMYK (print) image, whose grey levels cannot be recovered reliably; "
                    "save it as greyscale or RGB (e.g. PNG) and try again")
            if mode in ("L", "1"):
                arr = np.asarray(im.convert("L"))
            elif mode.startswith("I") or mode == "F":
                arr = np.asarray(im)
                if arr.dtype.byteorder == ">":
                    arr = arr.astype(arr.dtype.newbyteorder("="))
            else:
                arr = np.asarray(im.convert("RGB"))
    except InvalidImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        frame = _jpeg_frame(p) if p.name.lower().endswith((".jpg", ".jpeg")) else None
        if frame is not None and (frame[1] != 8 or frame[0] in _JPEG_LOSSLESS):
            kind = "lossless " if frame[0] in _JPEG_LOSSLESS else ""
            raise ImageReadError(
                f"{p.name} is a {frame[1]}-bit {kind}JPEG (a kind found inside DICOM files); only "
                "8-bit JPEG can be read: convert it to a 16-bit PNG or TIFF first") from exc
        raise ImageReadError(f"cannot read {p.name} as an image ({exc}); the file may be truncated "
                             "or not an image") from exc
    if arr.ndim == 3 and arr.shape[-1] > 3:
        arr = arr[..., :3]
    return Volume(np.ascontiguousarray(arr)[None], modality="image", source=p.suffix.lower().lstrip("."))


# JPEG start-of-frame markers (ITU T.81 table B.1): SOF0-3, 5-7, 9-11, 13-15; 3/7/11/15 are lossless
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_JPEG_LOSSLESS = frozenset({0xC3, 0xC7, 0xCB, 0xCF})


def _jpeg_frame(p: Path) -> tuple[int, int] | None:
    """(SOF marker, sample precision in bits) of a JPEG file, or None when it has no frame header
    before its first scan (not a JPEG, or truncated). Reads at most 1 MB (the header segments)."""
    try:
        with open(p, "rb") as f:
            data = f.read(1 << 20)
    except OSError:
        return None
    if data[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 < len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        if marker in _JPEG_SOF:
            return marker, data[pos + 4]
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header came first
            return None
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return None
