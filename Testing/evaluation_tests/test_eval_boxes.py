"""Box parsing and IoU edge cases (hand-checkable), Uni-Med 2D and M3D 3D conventions."""

from __future__ import annotations

import pytest

from medmvl_core.evaluation.box_metrics import (iou_2d_inclusive, iou_3d_m3d, iou_3d_standard,
                                                parse_box_2d, parse_box_3d, xywh_to_xyxy)


@pytest.mark.parametrize("text,expected", [
    ("{<10><20><50><60>}", [20.0, 20.0, 100.0, 60.0]),
    ("{<10><20><50><60>} is the liver", [20.0, 20.0, 100.0, 60.0]),   # text after: fine
    ("{ <10> <20> <50> <60> }", [20.0, 20.0, 100.0, 60.0]),           # all spaces removed
    ("<unk>{<10><20><50><60>}", [20.0, 20.0, 100.0, 60.0]),
    ("The box is {<10><20><50><60>}", None),                           # anchored at the start
    ("{<1000><20><50><60>}", None),                                    # at most 3 digits
    ("{<10><20><50>}", None),
    ("", None),
    ("肝脏 {<10><20><50><60>}", None),
])
def test_parse_box_2d(text, expected):
    assert parse_box_2d(text, [200, 100]) == expected


def test_parse_box_2d_truncation_free_scaling():
    assert parse_box_2d("{<33><33><66><66>}", [300, 90]) == pytest.approx([99.0, 29.7, 198.0, 59.4])


def test_iou_2d_inclusive_hand_values():
    gt = xywh_to_xyxy([0, 0, 9, 9])            # 10 x 10 inclusive pixels
    assert gt == [0, 0, 9, 9]
    assert iou_2d_inclusive(gt, gt) == 1.0
    assert iou_2d_inclusive([5, 5, 14, 14], gt) == pytest.approx(25 / 175)
    assert iou_2d_inclusive([20, 20, 30, 30], gt) == 0.0
    # touching edges share one pixel row/column under the +1 convention
    assert iou_2d_inclusive([9, 0, 18, 9], gt) == pytest.approx(10 / 190)
    assert iou_2d_inclusive([0, 0, -1, -1], [0, 0, -1, -1]) == 0.0   # zero union guarded


@pytest.mark.parametrize("text,expected", [
    ("Coordinates are <bx_start>[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]<bx_end>.", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]),
    ("[0, 0.25, .5, 1, 1, 1] then [0.9, 0.9, 0.9, 1, 1, 1]", [0, 0.25, 0.5, 1, 1, 1]),  # first match
    ("[0.1,0.2,0.3,0.4,0.5,0.6]", None),          # M3D needs ", " separators
    ("[0.1, 0.2, 0.3, 0.4, 0.5]", None),
    ("no box", None),
    ("", None),
])
def test_parse_box_3d(text, expected):
    assert parse_box_3d(text) == expected


def test_iou_3d_m3d_vs_standard_hand_values():
    a = [0, 0, 0, 0.5, 0.5, 0.5]
    b = [0.25, 0.25, 0.25, 0.75, 0.75, 0.75]
    inter = 0.25 ** 3
    assert iou_3d_m3d(a, b) == pytest.approx(inter / (0.75 ** 3 + 1e-6))     # enclosing box
    assert iou_3d_standard(a, b) == pytest.approx(inter / (2 * 0.125 - inter))
    assert iou_3d_m3d(a, b) < iou_3d_standard(a, b)
    assert iou_3d_standard(a, a) == 1.0
    assert iou_3d_m3d(a, a) == pytest.approx(1.0, abs=1e-5)
    assert iou_3d_m3d(a, [0.6, 0.6, 0.6, 0.9, 0.9, 0.9]) == 0.0
    assert iou_3d_standard([0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]) == 0.0
