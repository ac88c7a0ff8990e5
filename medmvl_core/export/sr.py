"""A conversation as a DICOM Comprehensive 3D Structured Report (highdicom).

The report references the source series (its instances are the SR's evidence: Study, Series and
SOP Instance UIDs), holds each question and answer as TEXT, each box as SCOORD3D in the source's
patient frame of reference, and names the model as the observer device. It is marked
unverified and says "AI-generated, not reviewed". Only an image that was read from DICOM can be
referenced: for NIfTI / NRRD / PNG input :class:`SRUnavailableError` says why, and nothing is
invented (no made-up source UIDs).

Box encoding: SCOORD3D ``POLYLINE`` through the 8 corners of the box (voxel edges, half a voxel
outside the first and last voxel centres) in the order
``(i1,j1,k1) (i2,j1,k1) (i2,j2,k1) (i1,j2,k1) (i1,j1,k2) (i2,j1,k2) (i2,j2,k2) (i1,j2,k2)`` of
the volume's index axes; a TEXT sibling gives the label, voxel ranges and size in mm. DICOM has
no box graphic type; a polyline of the corners keeps an oblique box exact.

``highdicom`` and ``pydicom`` are imported lazily (extra ``export``); the client never needs them.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from medmvl_core.client.records import AI_FLAG, BoxRecord, Conversation, TASK_LABELS, describe_box
from medmvl_core.errors import MedMVLError

logger = logging.getLogger(__name__)

MANUFACTURER = "MedM-VL for 3D Slicer"
#: Private coding scheme (DICOM PS3.16: designators starting with "99" are local).
SCHEME = "99MEDMVL"
# Index order of the 8 corners written for a box (see the module docstring).
_CORNER_ORDER = [(0, 0, 0), (1, 0, 0), (1, 1, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (1, 1, 1), (0, 1, 1)]


class SRUnavailableError(MedMVLError, ValueError):
    """An SR cannot be written for this conversation (no DICOM source, mismatched geometry)."""

    code = "sr_unavailable"


def _hd():
    try:
        import highdicom
        import pydicom
    except ImportError as exc:
        raise SRUnavailableError(
            f"DICOM SR export needs highdicom ({exc}); install it with "
            "pip install 'medmvl-slicer[export]' (in Slicer: slicer.util.pip_install('highdicom'))"
        ) from exc
    return highdicom, pydicom


def read_source_headers(path: str | os.PathLike, series_uid: str | None = None) -> list:
    """Headers (no pixels) of the image series the viewer read from ``path`` (a DICOM file or
    folder): ``series_uid`` or, as the reader does, the series with the most files."""
    import pydicom  # a base dependency: headers need no highdicom

    p = Path(path)
    files = [p] if p.is_file() else sorted(e for e in p.rglob("*") if e.is_file())
    groups: dict[str, list] = {}
    for f in files:
        try:
            ds = pydicom.dcmread(str(f), stop_before_pixels=True)
        except Exception:  # not DICOM: skipped, as the reader does
            continue
        if "SeriesInstanceUID" in ds and "Rows" in ds and str(ds.get("Modality", "")) not in (
                "SR", "SEG", "PR", "KO", "RTSTRUCT"):
            groups.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    if not groups:
        return []
    uid = series_uid if series_uid in groups else max(groups, key=lambda u: len(groups[u]))
    return groups[uid]


def dicom_refs(datasets: Sequence[Any]) -> dict[str, Any]:
    """The UIDs a record keeps of its DICOM source (for :class:`~medmvl_core.client.records.VolumeRef`)."""
    if not datasets:
        return {}
    first = datasets[0]
    return {"study_uid": str(first.StudyInstanceUID), "series_uid": str(first.SeriesInstanceUID),
            "frame_of_reference_uid": str(first.get("FrameOfReferenceUID", "")),
            "sop_class_uid": str(first.SOPClassUID),
            "sop_instance_uids": [str(ds.SOPInstanceUID) for ds in datasets]}


def _check_source(conv: Conversation, datasets: Sequence[Any]) -> None:
    if not datasets:
        raise SRUnavailableError(
            "a DICOM SR needs a DICOM source: this image was not read from DICOM (NIfTI, NRRD, PNG "
            "... carry no study, series or instance UIDs to reference). Export Markdown or text "
            "instead, or load the original DICOM series and ask again")
    series = {str(ds.SeriesInstanceUID) for ds in datasets}
    studies = {str(ds.StudyInstanceUID) for ds in datasets}
    if len(series) > 1 or len(studies) > 1:
        raise SRUnavailableError("the source instances belong to several series; give the one "
                                 "series the conversation is about")
    want = conv.volume.dicom.get("series_uid")
    if want and want not in series:
        raise SRUnavailableError(
            f"the conversation was about series {want}, not the given series {series.pop()}; "
            "export with the series the image was loaded from")
    _check_geometry(conv, datasets)


def _check_geometry(conv: Conversation, datasets: Sequence[Any]) -> None:
    """Every source slice position must be a slice origin of the recorded geometry, so boxes
    written in patient coordinates land where they were shown."""
    shape = conv.volume.shape
    if len(shape) < 3 or len(datasets) < 2:
        return
    m = np.asarray(conv.volume.ijk_to_lps, float)
    origins = np.array([m @ [0.0, 0.0, k, 1.0] for k in range(int(shape[0]))])[:, :3]
    tol = 0.05 * float(min(np.linalg.norm(m[:3, :3], axis=0))) + 1e-3
    for ds in datasets:
        ipp = ds.get("ImagePositionPatient")
        if ipp is None:
            continue
        d = np.min(np.linalg.norm(origins - np.asarray([float(v) for v in ipp]), axis=1))
        if d > tol:
            raise SRUnavailableError(
                f"the conversation's image geometry does not match the DICOM series (a slice is "
                f"{d:.2f} mm from every recorded slice); was the image resampled or moved after "
                "loading? Export Markdown instead")


def box_polyline(box: BoxRecord, ijk_to_lps: np.ndarray) -> np.ndarray:
    """[8, 3] float32 corners (LPS mm) of a 3D voxel box in the documented order."""
    k1, j1, i1, k2, j2, i2 = (float(v) for v in box.voxel)
    lo, hi = (i1 - 0.5, j1 - 0.5, k1 - 0.5), (i2 - 0.5, j2 - 0.5, k2 - 0.5)
    pts = np.array([[hi[a] if c[a] else lo[a] for a in range(3)] + [1.0] for c in _CORNER_ORDER])
    return (pts @ np.asarray(ijk_to_lps, float).T)[:, :3].astype(np.float32)


def _content(conv: Conversation, for_uid: str, hd, pydicom):
    C = hd.sr.CodedConcept
    comment, finding = C("121106", "DCM", "Comment"), C("121071", "DCM", "Finding")
    region, question = C("111030", "DCM", "Image Region"), C("QUESTION", SCHEME, "Question to the model")
    root = hd.sr.ContainerContentItem(C("18748-4", "LN", "Diagnostic imaging report"))
    items = []
    models = conv.models()
    for m in models:
        device = hd.sr.DeviceObserverIdentifyingAttributes(
            uid=pydicom.uid.generate_uid(entropy_srcs=[m.name, m.revision, m.content_hash]),
            name=m.name[:64], manufacturer_name=MANUFACTURER,
            model_name=(f"{m.name} {m.revision[:12] or m.content_hash[:12]}").strip()[:64])
        obs = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
            observer_type=C("121007", "DCM", "Device"), observer_identifying_attributes=device))
        items.extend(obs)
    flag = AI_FLAG + ". " + " ".join(f"Model: {m.label()}." for m in models)
    items.append(hd.sr.TextContentItem(comment, flag, relationship_type="CONTAINS"))
    spacing = conv.volume.spacing()
    m = np.asarray(conv.volume.ijk_to_lps, float)
    for t in conv.turns:
        turn = hd.sr.ContainerContentItem(C("TURN", SCHEME, "Question and answer"),
                                          relationship_type="CONTAINS")
        kids = [hd.sr.TextContentItem(question, f"{TASK_LABELS.get(t.task, t.task)}"
                                      + (f": {t.question}" if t.question else ""),
                                      relationship_type="CONTAINS"),
                hd.sr.TextContentItem(finding, t.answer or "(no answer)", relationship_type="CONTAINS")]
        boxes = ([t.region] if t.region is not None else []) + list(t.boxes)
        for b in boxes:
            if len(b.voxel) != 6:
                continue  # 2D boxes: the text says where; SCOORD3D needs a 3D frame
            kids.append(hd.sr.TextContentItem(comment, describe_box(b, spacing),
                                              relationship_type="CONTAINS"))
            if for_uid:
                kids.append(hd.sr.Scoord3DContentItem(
                    region, hd.sr.GraphicTypeValues3D.POLYLINE, box_polyline(b, m), for_uid,
                    relationship_type="CONTAINS"))
        turn.ContentSequence = kids
        items.append(turn)
    root.ContentSequence = items
    return root


# Patient / study attributes of type 2 the SR copies from its evidence: present but empty when
# a (non-conformant) source lacks them, as DICOM's "unknown".
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "StudyID", "AccessionNumber", "ReferringPhysicianName")


def _with_type2(ds):
    missing = [kw for kw in _TYPE2 if kw not in ds]
    if not missing:
        return ds
    ds = copy.deepcopy(ds)
    for kw in missing:
        setattr(ds, kw, "")
    return ds


def write_sr(conv: Conversation, datasets: Sequence[Any], path: str | os.PathLike,
             series_number: int = 900) -> Path:
    """Write ``conv`` as a Comprehensive 3D SR referencing ``datasets`` (the source series'
    headers) to ``path`` (via a temporary file and a rename: never half-written)."""
    hd, pydicom = _hd()
    _check_source(conv, datasets)
    if not conv.turns:
        raise SRUnavailableError("the conversation is empty; ask the model something first")
    for_uid = str(datasets[0].get("FrameOfReferenceUID", ""))
    if not for_uid:
        logger.warning("the source has no Frame of Reference UID: boxes are written as text only")
    sr = hd.sr.Comprehensive3DSR(
        evidence=[_with_type2(ds) for ds in datasets], content=_content(conv, for_uid, hd, pydicom),
        series_instance_uid=hd.UID(), series_number=series_number, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer=MANUFACTURER, is_complete=True, is_final=False,
        is_verified=False, series_description="MedM-VL answers (AI-generated, not reviewed)")
    sr.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: answers and box texts are not Latin-1
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".medmvl-sr-", suffix=".dcm", dir=str(out.parent))
    os.close(fd)
    try:
        sr.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
