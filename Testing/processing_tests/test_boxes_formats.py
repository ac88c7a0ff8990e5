"""Box text formats: format, parse (tolerant of surrounding text), round trips, errors."""

from __future__ import annotations

import numpy as np
import pytest

from medmvl_core.errors import BoxParseError
from medmvl_core.processing.boxes import find_boxes, format_box_2d, format_box_3d, parse_box_2d, parse_box_3d


def test_format_2d_and_3d_exact_strings():
    assert format_box_2d((10, 20, 30, 40)) == "{<10><20><30><40>}"
    assert format_box_2d((30.4, 40.6, 10, 20)) == "{<10><20><30><41>}"  # ordered and rounded
    assert format_box_2d((-5, 0, 120, 100)) == "{<0><0><100><100>}"  # clipped
    assert format_box_3d((0.1, 0.25, 0.3333, 0.5, 0.6, 0.7)) == "[0.100, 0.250, 0.333, 0.500, 0.600, 0.700]"
    assert format_box_3d((0.9, 0, 0, 0.1, 1.2, 1)) == "[0.100, 0.000, 0.000, 0.900, 1.000, 1.000]"


def test_parse_tolerant_of_text_and_m3d_markers():
    assert parse_box_2d("The opacity is at {<12><34><56><78>} in the left lung.") == (12, 34, 56, 78)
    assert parse_box_2d("box: { <1> <2> <3> <4> }") == (1, 2, 3, 4)
    assert parse_box_3d("Nodule: <bx_start>[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]<bx_end> seen.") == \
        (0.1, 0.2, 0.3, 0.4, 0.5, 0.6)
    assert parse_box_3d("[.5,0.2,0.3,0.1,0.25,1.5]") == (0.1, 0.2, 0.3, 0.5, 0.25, 1.0)


def test_round_trips_random():
    rng = np.random.default_rng(0)
    for _ in range(200):
        b2 = tuple(int(v) for v in np.sort(rng.integers(0, 101, size=(2, 2)), axis=0).T.ravel()[[0, 2, 1, 3]])
        x1, x2, y1, y2 = b2[0], b2[1], b2[2], b2[3]
        box2 = (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2))
        assert parse_box_2d(format_box_2d(box2)) == box2
        b3 = np.sort(rng.uniform(0, 1, size=(2, 3)), axis=0).ravel()
        parsed = parse_box_3d(format_box_3d(b3))
        assert np.allclose(parsed, b3, atol=5e-4)
        assert format_box_3d(parsed) == format_box_3d(b3)


def test_find_boxes_in_order_with_spans():
    text = "A {<1><2><3><4>} then <bx_start>[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]<bx_end> and {<5><6><7><8>}"
    found = find_boxes(text)
    assert [f["kind"] for f in found] == ["2d", "3d", "2d"]
    assert found[1]["box"] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    assert text[slice(*found[0]["span"])] == "{<1><2><3><4>}"
    assert find_boxes("no boxes here") == []


def test_errors():
    with pytest.raises(BoxParseError, match="no 2D box"):
        parse_box_2d("nothing")
    with pytest.raises(BoxParseError, match="no 3D box"):
        parse_box_3d("[0.1, 0.2, 0.3]")
    with pytest.raises(BoxParseError, match="6 numbers"):
        format_box_3d([0.1, 0.2])
    with pytest.raises(BoxParseError, match="sequence"):
        format_box_2d(5)


def test_box_text_through_geometry_round_trip():
    """Slicer ROI (voxels) -> prompt text -> parse -> voxels again."""
    from medmvl_core.imaging import default_spec, preprocess

    hu = np.random.default_rng(1).integers(-900, 900, size=(40, 64, 64)).astype(np.int16)
    _, geom = preprocess(hu, default_spec("siglip_slices", 32))
    roi = (8, 16, 24, 20, 40, 48)
    text = f"What is in {format_box_3d(geom.voxel_box_to_model(roi))}?"
    back = geom.model_box_to_voxel(parse_box_3d(text))
    # 3 decimals on a 40/64-voxel axis is exact to the voxel
    assert back == roi
