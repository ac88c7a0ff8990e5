"""Conversations saved with the scene, on slicer-core's real MRML classes: write, save as a
``.mrb`` bundle, load back (into an empty scene and imported into a busy one), compare.

The reference for the boxes is MRML itself: the reloaded ROI nodes map back (through
``mrml_geometry.roi_node_to_voxel_box``) to the voxel boxes that were stored, and their RAS
bounds equal the bounds before saving.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is installed by `make test` (dev extra)")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("the installed `slicer` is not slicer-core", allow_module_level=True)

import vtk  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "MedMVLSlicer"))
from MedMVLSlicerLib import mrml_geometry as mg  # noqa: E402
from MedMVLSlicerLib import scene_records as sr  # noqa: E402

from medmvl_core.client import records as rec  # noqa: E402
from medmvl_core.client.model_identity import ModelIdentity  # noqa: E402
from medmvl_core.errors import RoiError  # noqa: E402


def _scene():
    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkMRMLApplicationLogic()
    app_logic.SetMRMLScene(scene)
    markups = slicer.vtkSlicerMarkupsLogic()  # registers the markups nodes and their storage
    markups.SetMRMLScene(scene)
    scene._keep = (app_logic, markups)  # keep the logics alive with the scene
    return scene, app_logic


def _volume(scene, name="chest CT"):
    node = slicer.vtkMRMLScalarVolumeNode()
    node.SetName(name)
    scene.AddNode(node)
    img = vtk.vtkImageData()
    img.SetDimensions(20, 16, 12)
    img.AllocateScalars(vtk.VTK_SHORT, 1)
    node.SetAndObserveImageData(img)
    slicer.util.arrayFromVolume(node)[...] = 7
    node.SetSpacing(0.8, 0.8, 2.5)
    node.SetOrigin(-10.0, 20.0, 5.0)
    c, s = np.cos(0.3), np.sin(0.3)  # rotated about S: boxes are not axis-aligned in RAS
    node.SetIJKToRASDirections(-c, s, 0.0, -s, -c, 0.0, 0.0, 0.0, 1.0)
    node.AddDefaultStorageNode()
    return node


def _turns(long_answer=False):
    ident = ModelIdentity(name="MedM-VL demo (phantoms)", content_hash="0123456789abcdef",
                          intended_use="trained on synthetic phantoms only, not for clinical use")
    answer = ("Findings: a 9 mm nodule in the right upper lobe. " * (60 if long_answer else 1)).strip()
    return [
        rec.Turn(task="find", question="nodule", answer="Here it is.", model=ident,
                 generation={"max_new_tokens": 48}, asked_at="2026-12-06T20:00:00Z",
                 answered_at="2026-12-06T20:00:01Z",
                 boxes=[rec.BoxRecord(voxel=[2, 3, 4, 6, 9, 12], label="nodule"),
                        rec.BoxRecord(voxel=[0, 0, 0, 3, 4, 5], label="nodule")]),
        rec.Turn(task="describe", question="", answer=answer, model=ident,
                 region=rec.BoxRecord(voxel=[1, 1, 1, 5, 5, 5], source="drawn")),
    ]


def _bounds(node):
    b = [0.0] * 6
    node.GetRASBounds(b)
    return np.array(b)


def _save_mrb(scene, app_logic, tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    assert app_logic.SaveSceneToSlicerDataBundleDirectory(str(bundle), None)
    mrb = tmp_path / "study.mrb"
    assert app_logic.Zip(str(mrb), str(bundle))
    return mrb


@pytest.mark.parametrize("long_answer", [False, True])
def test_conversation_and_boxes_survive_an_mrb_round_trip(tmp_path, long_answer):
    scene, app_logic = _scene()
    vol = _volume(scene)
    drawn = mg.voxel_box_to_roi_node(scene, vol, (1, 1, 1, 5, 5, 5), "my ROI")
    conv = rec.Conversation(volume=rec.VolumeRef(key=vol.GetID(), shape=[12, 16, 20]),
                            turns=_turns(long_answer)[:1])
    text_node, new = sr.store(scene, vol, conv)
    assert len(new) == 2 and text_node.GetAttribute(sr.ATTR_FORMAT) == "medmvl.conversation"
    conv.turns.append(_turns(long_answer)[1])
    _, new2 = sr.store(scene, vol, conv, region_roi=drawn)  # second answer: nothing duplicated
    assert new2 == [] and text_node.GetNumberOfNodeReferences(sr.ROLE_BOX) == 3
    before = {key: _bounds(scene.GetNodeByID(b.roi_id)) for key, b in sr._iter_boxes(conv)}

    mrb = _save_mrb(scene, app_logic, tmp_path)
    scene2, logic2 = _scene()
    (tmp_path / "open").mkdir()
    assert logic2.OpenSlicerDataBundle(str(mrb), str(tmp_path / "open"))
    vol2 = scene2.GetFirstNodeByName("chest CT")
    back = sr.load(vol2)
    assert [t.to_dict() | {"boxes": None, "region": None} for t in back.turns] == \
           [t.to_dict() | {"boxes": None, "region": None} for t in conv.turns]
    for key, box in sr._iter_boxes(back):
        roi = scene2.GetNodeByID(box.roi_id)
        assert roi is not None and roi.IsA("vtkMRMLMarkupsROINode"), key
        assert tuple(mg.roi_node_to_voxel_box(roi, vol2)) == tuple(box.voxel), key
        assert np.allclose(_bounds(roi), before[key], atol=1e-4), key
    assert scene2.GetNodeByID(back.turns[1].region.roi_id).GetName() == "my ROI"


def test_import_into_a_busy_scene_follows_renamed_nodes(tmp_path):
    scene, app_logic = _scene()
    vol = _volume(scene)
    conv = rec.Conversation(turns=_turns()[:1])
    sr.store(scene, vol, conv)
    mrb = _save_mrb(scene, app_logic, tmp_path)
    # The target scene already holds a volume, text and ROI nodes: imported IDs get renumbered.
    busy, busy_logic = _scene()
    other = _volume(busy, "other")
    sr.store(busy, other, rec.Conversation(turns=_turns()[:1]))
    (tmp_path / "unpacked").mkdir()
    mrml = busy_logic.UnpackSlicerDataBundle(str(mrb), str(tmp_path / "unpacked"))
    busy.SetURL(mrml)
    assert busy.Import()
    imported = [n for n in (busy.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
                            for i in range(busy.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")))
                if n.GetName() == "chest CT"][0]
    back = sr.load(imported)
    ids = [b.roi_id for b in back.turns[0].boxes]
    assert all(ids) and ids != [b.roi_id for b in sr.load(other).turns[0].boxes]
    for box in back.turns[0].boxes:
        assert tuple(mg.roi_node_to_voxel_box(busy.GetNodeByID(box.roi_id), imported)) == tuple(box.voxel)


def test_unreadable_or_newer_records_give_a_clear_message():
    scene, _ = _scene()
    vol = _volume(scene)
    assert sr.load(vol) is None
    text_node, _ = sr.store(scene, vol, rec.Conversation(turns=_turns()[:1]))
    text_node.SetText('{"format": "medmvl.conversation", "version": 99, "turns": []}')
    with pytest.raises(rec.RecordFormatError, match="'chest CT' cannot be read: .*newer MedM-VL"):
        sr.load(vol)
    text_node.SetText("Findings: typed by hand")
    with pytest.raises(rec.RecordFormatError, match="not valid JSON"):
        sr.load(vol)
    # a degenerate found box (outside the volume) is kept in the record without an ROI node
    bad = rec.Conversation(turns=[rec.Turn(task="find", question="x", answer="?", model=ModelIdentity(name="m"),
                                           boxes=[rec.BoxRecord(voxel=[50, 50, 50, 60, 60, 60])])])
    sr.forget(scene, vol)
    _, new = sr.store(scene, vol, bad)
    assert new == [] and sr.load(vol).turns[0].boxes[0].roi_id == ""
    sr.forget(scene, vol)
    assert sr.load(vol) is None and scene.GetNodeByID(text_node.GetID()) is None
    with pytest.raises(ValueError, match="select an image"):
        sr.store(scene, None, rec.Conversation())


# ---------------------------------------------------------------- segments as regions
def _segment(scene, extent, spacing=(0.8, 0.8, 2.5), origin=(0.0, 0.0, 0.0), fill=1):
    from MedMVLSlicerLib import segment_region  # noqa: F401  (imported for the test below)

    seg = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(seg)
    image = slicer.vtkOrientedImageData()
    image.SetExtent(*extent)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    image.GetPointData().GetScalars().Fill(fill)
    image.SetSpacing(*spacing)
    image.SetOrigin(*origin)
    segment = slicer.vtkSegment()
    segment.SetName("liver")
    segment.AddRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName(), image)
    seg.GetSegmentation().AddSegment(segment, "liver")
    return seg


def test_segment_region_on_the_volume_grid_and_errors():
    from MedMVLSlicerLib import segment_region

    scene, _ = _scene()
    vol = _volume(scene)
    m = mg.volume_ijk_to_world(vol)
    # The segment on the volume's own grid: voxels i 2..8, j 5..10, k 3..6 of the volume.
    seg = _segment(scene, (2, 8, 5, 10, 3, 6), spacing=(1.0, 1.0, 1.0))
    image = seg.GetSegmentation().GetSegment("liver").GetRepresentation("Binary labelmap")
    image.SetDirectionMatrix(_dir_matrix(m))
    image.SetSpacing(0.8, 0.8, 2.5)
    image.SetOrigin(*m[:3, 3])
    region = segment_region.segment_region(seg, "liver", vol)
    assert region.box == (3, 5, 2, 7, 11, 9) and not region.clipped and region.voxels == 7 * 6 * 4
    # The same box as an ROI drawn around those voxels.
    roi = mg.voxel_box_to_roi_node(scene, vol, region.box, "drawn")
    assert mg.roi_node_to_voxel_box(roi, vol) == region.box
    with pytest.raises(RoiError, match="'liver' is empty"):
        segment_region.segment_region(_segment(scene, (0, 3, 0, 3, 0, 3), fill=0), "liver", vol)
    with pytest.raises(RoiError, match="lies outside the image"):
        segment_region.segment_region(_segment(scene, (0, 3, 0, 3, 0, 3), origin=(900.0, 0.0, 0.0)), "liver", vol)
    with pytest.raises(RoiError, match="not in"):
        segment_region.segment_region(seg, "spleen", vol)


def _dir_matrix(ijk_to_ras):
    d = vtk.vtkMatrix4x4()
    axes = ijk_to_ras[:3, :3] / np.linalg.norm(ijk_to_ras[:3, :3], axis=0)
    for r in range(3):
        for c in range(3):
            d.SetElement(r, c, float(axes[r, c]))
    return d
