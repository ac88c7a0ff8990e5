"""DICOM Comprehensive 3D SR export: written with highdicom, read back with pydicom/highdicom,
references and coordinates checked against the source series' own DICOM geometry, and
validated with dciodvfy (Debian dicom3tools) when it is installed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

hd = pytest.importorskip("highdicom", reason="highdicom is in the export/dev extras")
import pydicom  # noqa: E402

from medmvl_core.client import records as rec  # noqa: E402
from medmvl_core.client.model_identity import ModelIdentity  # noqa: E402
from medmvl_core.export import sr  # noqa: E402
from medmvl_core.imaging import read_image  # noqa: E402
from medmvl_core.imaging.testing import write_ct_slice  # noqa: E402

SPACING = (0.7, 0.8, 2.5)  # column, row, slice (mm)
COS, SIN = np.cos(0.4), np.sin(0.4)
IOP = (COS, SIN, 0.0, 0.0, 0.0, -1.0)  # oblique: rows tilted in the axial plane, columns along -S
FOR_UID = "1.2.826.0.1.3680043.8.498.111"


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ct")
    normal = np.cross(IOP[:3], IOP[3:])
    origin = np.array([-10.0, 20.0, 30.0])
    hu = np.zeros((5, 6, 7))
    for k in range(5):
        write_ct_slice(folder / f"im{k}.dcm", hu[k], position=origin + k * SPACING[2] * normal, iop=IOP,
                       spacing=SPACING, series_uid="1.2.826.0.1.3680043.8.498.222", instance=k + 1,
                       frame_uid=FOR_UID)
    return folder


def _conversation(folder, datasets):
    vol = read_image(str(folder))
    m = np.eye(4)
    m[:3, :3] = np.asarray(vol.direction) * np.asarray(vol.spacing)
    m[:3, 3] = vol.origin
    ident = ModelIdentity(name="MedM-VL demo (phantoms)", content_hash="0123456789abcdef",
                          intended_use="trained on synthetic phantoms only, not for clinical use")
    turns = [rec.Turn(task="find", question="nodule", answer="[0.2, 0.3, 0.4, 0.6, 0.7, 0.8]", model=ident,
                      boxes=[rec.BoxRecord(voxel=[1, 2, 3, 4, 5, 6], label="nodule")]),
             rec.Turn(task="describe", question="", answer="A small cyst.", model=ident,
                      region=rec.BoxRecord(voxel=[0, 0, 0, 2, 3, 4], source="drawn"))]
    return rec.Conversation(volume=rec.VolumeRef(shape=list(vol.array.shape), ijk_to_lps=m.tolist(),
                                                 modality="CT", dicom=sr.dicom_refs(datasets)),
                            turns=turns)


def _expected_corners(datasets, voxel):
    """Corners from the DICOM tags alone (PS3.3 C.7.6.2.1.1): IPP + i*dc*row + j*dr*col + k*dz*n."""
    row, col = np.array(IOP[:3]), np.array(IOP[3:])
    normal = np.cross(row, col)
    ipps = sorted((np.array([float(v) for v in ds.ImagePositionPatient]) for ds in datasets),
                  key=lambda p: float(p @ normal))
    first, dz = ipps[0], float((ipps[1] - ipps[0]) @ normal)
    dr, dc = (float(v) for v in datasets[0].PixelSpacing)
    k1, j1, i1, k2, j2, i2 = voxel
    out = []
    for ci, cj, ck in [(0, 0, 0), (1, 0, 0), (1, 1, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (1, 1, 1), (0, 1, 1)]:
        i = (i2 if ci else i1) - 0.5
        j = (j2 if cj else j1) - 0.5
        k = (k2 if ck else k1) - 0.5
        out.append(first + i * dc * row + j * dr * col + k * dz * normal)
    return np.array(out)


def _items(ds):
    """Every content item of an SR, depth first."""
    for item in getattr(ds, "ContentSequence", []):
        yield item
        yield from _items(item)


def test_sr_references_the_series_and_places_boxes_in_patient_space(series, tmp_path):
    datasets = sr.read_source_headers(series)
    conv = _conversation(series, datasets)
    out = sr.write_sr(conv, datasets, tmp_path / "answers.dcm")
    assert [p.name for p in tmp_path.iterdir()] == ["answers.dcm"]  # no temporary left behind
    ds = pydicom.dcmread(out)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert ds.VerificationFlag == "UNVERIFIED" and ds.StudyInstanceUID == datasets[0].StudyInstanceUID
    ev = ds.CurrentRequestedProcedureEvidenceSequence[0]
    assert ev.StudyInstanceUID == datasets[0].StudyInstanceUID
    ref_series = ev.ReferencedSeriesSequence[0]
    assert ref_series.SeriesInstanceUID == "1.2.826.0.1.3680043.8.498.222"
    assert {s.ReferencedSOPInstanceUID for s in ref_series.ReferencedSOPSequence} == \
           {d.SOPInstanceUID for d in datasets}

    items = list(_items(ds))
    texts = [str(i.TextValue) for i in items if i.ValueType == "TEXT"]
    assert any(t.startswith("AI-generated, not reviewed. Model: MedM-VL demo (phantoms)") for t in texts)
    assert "Find: nodule" in texts and "A small cyst." in texts
    assert any(t.startswith("nodule: slices 1–3, rows 2–4, columns 3–5") for t in texts)
    device = [i for i in items if i.ValueType == "TEXT" and i.ConceptNameCodeSequence[0].CodeValue == "121013"]
    assert device and device[0].TextValue == "MedM-VL demo (phantoms)"  # Device Observer Name
    scoords = [i for i in items if i.ValueType == "SCOORD3D"]
    assert len(scoords) == 2 and all(i.ReferencedFrameOfReferenceUID == FOR_UID for i in scoords)
    found = np.asarray(scoords[0].GraphicData, float).reshape(-1, 3)
    assert np.allclose(found, _expected_corners(datasets, [1, 2, 3, 4, 5, 6]), atol=1e-3)
    region = np.asarray(scoords[1].GraphicData, float).reshape(-1, 3)
    assert np.allclose(region, _expected_corners(datasets, [0, 0, 0, 2, 3, 4]), atol=1e-3)
    # highdicom reads its own output back as a Comprehensive 3D SR
    back = hd.sr.Comprehensive3DSR.from_dataset(ds)
    assert back.SeriesDescription.startswith("MedM-VL answers")


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools (dciodvfy) is not installed")
def test_sr_passes_dciodvfy(series, tmp_path):
    datasets = sr.read_source_headers(series)
    out = sr.write_sr(_conversation(series, datasets), datasets, tmp_path / "answers.dcm")
    res = subprocess.run(["dciodvfy", str(out)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error")]
    assert errors == [], res.stdout + res.stderr


def test_sr_refuses_non_dicom_and_mismatched_sources(series, tmp_path):
    datasets = sr.read_source_headers(series)
    conv = _conversation(series, datasets)
    with pytest.raises(sr.SRUnavailableError, match="not read from DICOM"):
        sr.write_sr(conv, [], tmp_path / "a.dcm")
    other = rec.Conversation.from_dict(conv.to_dict())
    other.volume.dicom["series_uid"] = "1.2.3.4"
    with pytest.raises(sr.SRUnavailableError, match="not the given series"):
        sr.write_sr(other, datasets, tmp_path / "a.dcm")
    moved = rec.Conversation.from_dict(conv.to_dict())
    moved.volume.ijk_to_lps[0][3] += 12.0  # the image was moved after loading
    with pytest.raises(sr.SRUnavailableError, match="geometry does not match"):
        sr.write_sr(moved, datasets, tmp_path / "a.dcm")
    with pytest.raises(sr.SRUnavailableError, match="empty"):
        sr.write_sr(rec.Conversation(volume=conv.volume), datasets, tmp_path / "a.dcm")
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    assert sr.read_source_headers(tmp_path) == []


def test_export_command_writes_md_and_sr_and_explains_errors(series, tmp_path, capsys):
    from medmvl_core.cli import main

    datasets = sr.read_source_headers(series)
    src = tmp_path / "answers.json"
    src.write_text(_conversation(series, datasets).to_json())
    assert main(["export", str(src), "-o", str(tmp_path / "a.md")]) == 0
    assert (tmp_path / "a.md").read_text(encoding="utf-8").startswith("## MedM-VL answers — AI-generated, not reviewed")
    assert main(["export", str(src), "--dicom", str(series), "-o", str(tmp_path / "a.dcm")]) == 0
    assert pydicom.dcmread(tmp_path / "a.dcm").Modality == "SR"
    capsys.readouterr()
    assert main(["export", str(src), "-o", str(tmp_path / "b.dcm")]) == 1
    assert "give it with --dicom" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text('{"format": "medmvl.conversation", "version": 3}')
    assert main(["export", str(tmp_path / "bad.json"), "-o", str(tmp_path / "b.md")]) == 1
    assert "newer MedM-VL" in capsys.readouterr().err
    assert main(["export", str(src), "--dicom", str(tmp_path / "a.md"), "-o", str(tmp_path / "b.dcm")]) == 1
    assert "not read from DICOM" in capsys.readouterr().err and not (tmp_path / "b.dcm").exists()
