"""The burden numbers (inference.burden) on synthetic volumes whose lungs and ground glass are known exactly: volumes,
percentages, the right/left split in patient space (not by image side), the grade bands, the JSON form."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from inference.burden import Burden, LungBurden, grade, ground_glass_labels, measure_burden, write_burden
from inference.spec import SegmentSpec

# Patient space (LPS mm): the right lung spans x in [-70, -10), the left lung x in [30, 90), the mediastinum lies
# between; the midline is near x = +10, not at the scanner's x = 0.
RIGHT_X = (-70.0, -10.0)
LEFT_X = (30.0, 90.0)
Y = (-40.0, 40.0)
Z_SLICES = 10


def _image(array_zyx: np.ndarray, spacing: tuple[float, float, float], origin: tuple[float, float, float],
           flip_x: bool = False) -> sitk.Image:  # fmt: skip
    """An image of ``array_zyx`` laid out in patient space; with ``flip_x`` the columns run from patient left to
    right (direction -x), the array reversed so every voxel stays where it was in patient space."""
    if flip_x:
        array_zyx = array_zyx[:, :, ::-1]
        nx = array_zyx.shape[2]
        origin = (origin[0] + (nx - 1) * spacing[0], origin[1], origin[2])
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_zyx.astype(np.uint8)))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if flip_x:
        image.SetDirection((-1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    return image


def _boxes(spacing: tuple[float, float, float], origin: tuple[float, float, float], shape: tuple[int, int, int],
           boxes: list[tuple[tuple[float, float], tuple[float, float], tuple[int, int]]]) -> np.ndarray:  # fmt: skip
    """(z, y, x) mask of voxel centres inside the (x range mm, y range mm, z slice range) boxes."""
    _nz, ny, nx = shape
    x = origin[0] + spacing[0] * np.arange(nx)
    y = origin[1] + spacing[1] * np.arange(ny)
    out = np.zeros(shape, dtype=bool)
    for (x0, x1), (y0, y1), (z0, z1) in boxes:
        inside = ((x >= x0) & (x < x1))[None, :] & ((y >= y0) & (y < y1))[:, None]
        out[z0:z1] |= inside
    return out


LUNG_SPACING = (4.0, 4.0, 5.0)
LUNG_ORIGIN = (-98.0, -62.0, 0.0)
LUNG_SHAPE = (Z_SLICES, 32, 50)
LABEL_SPACING = (1.0, 1.0, 5.0)
LABEL_ORIGIN = (-99.5, -63.5, 0.0)
LABEL_SHAPE = (Z_SLICES, 128, 200)


def _case(flip_x: bool) -> tuple[sitk.Image, sitk.Image, dict[str, float]]:
    lungs = _boxes(LUNG_SPACING, LUNG_ORIGIN, LUNG_SHAPE, [(RIGHT_X, Y, (0, Z_SLICES)), (LEFT_X, Y, (0, Z_SLICES))])
    right_ggo = (RIGHT_X[0] + 10, RIGHT_X[0] + 30), (-20.0, 0.0), (2, 6)  # 20 x 20 mm x 4 slices
    left_ggo = (LEFT_X[0] + 5, LEFT_X[0] + 55), (-40.0, 30.0), (0, 9)  # 50 x 70 mm x 9 slices
    ggo = _boxes(LABEL_SPACING, LABEL_ORIGIN, LABEL_SHAPE, [right_ggo])
    ggo_left = _boxes(LABEL_SPACING, LABEL_ORIGIN, LABEL_SHAPE, [left_ggo])
    label = ggo.astype(np.uint8) + ggo_left.astype(np.uint8)
    lung_ml = (RIGHT_X[1] - RIGHT_X[0]) * (Y[1] - Y[0]) * 5.0 * Z_SLICES / 1000.0  # each lung: 60 x 80 mm x 50 mm
    expected = {
        "lung_ml": lung_ml,
        "right_ggo_ml": 20 * 20 * 5.0 * 4 / 1000.0,
        "left_ggo_ml": 50 * 70 * 5.0 * 9 / 1000.0,
    }
    return (
        _image(label, LABEL_SPACING, LABEL_ORIGIN, flip_x),
        _image(lungs, LUNG_SPACING, LUNG_ORIGIN, flip_x),
        expected,
    )


@pytest.mark.parametrize("flip_x", [False, True], ids=["columns-right-to-left", "columns-left-to-right"])
def test_volumes_percentages_and_sides_in_patient_space(flip_x: bool) -> None:
    label, lungs, expected = _case(flip_x)
    burden = measure_burden(label, lungs, (1,))
    assert burden.midline_x_mm is not None and -10.0 <= burden.midline_x_mm <= 30.0  # in the mediastinum
    assert burden.right.lung_ml == pytest.approx(expected["lung_ml"])
    assert burden.left.lung_ml == pytest.approx(expected["lung_ml"])
    assert burden.right.ggo_ml == pytest.approx(expected["right_ggo_ml"])
    assert burden.left.ggo_ml == pytest.approx(expected["left_ggo_ml"])
    assert burden.right.percent == pytest.approx(100 * expected["right_ggo_ml"] / expected["lung_ml"])
    assert burden.left.percent == pytest.approx(100 * expected["left_ggo_ml"] / expected["lung_ml"])
    assert burden.total.ggo_ml == pytest.approx(expected["right_ggo_ml"] + expected["left_ggo_ml"])
    assert burden.total.percent == pytest.approx(
        100 * (expected["right_ggo_ml"] + expected["left_ggo_ml"]) / (2 * expected["lung_ml"])
    )
    assert (burden.right.grade, burden.left.grade) == (1, 4)  # 0.83 % and 65.6 %


def test_total_volume_is_every_ground_glass_voxel() -> None:
    """Right + left is the whole mask, so the report's total equals a SEG's volume of the same mask."""
    label, lungs, _ = _case(False)
    burden = measure_burden(label, lungs, (1,))
    voxels = int(np.count_nonzero(sitk.GetArrayViewFromImage(label)))
    assert burden.total.ggo_ml == pytest.approx(voxels * float(np.prod(LABEL_SPACING)) / 1000.0)


def test_only_the_ground_glass_labels_count() -> None:
    label, lungs, expected = _case(False)
    other = sitk.GetArrayFromImage(label)
    other[other == 1] = 2  # another segment's label
    relabelled = sitk.GetImageFromArray(other)
    relabelled.CopyInformation(label)
    assert measure_burden(relabelled, lungs, (1,)).total.ggo_ml == 0.0
    assert measure_burden(relabelled, lungs, (2,)).total.ggo_ml == pytest.approx(
        expected["right_ggo_ml"] + expected["left_ggo_ml"]
    )
    assert ground_glass_labels([SegmentSpec(1, "Ground glass opacity"), SegmentSpec(2, "Consolidation")]) == (1,)


def test_no_lung_gives_zeros_and_no_midline() -> None:
    label, lungs, _ = _case(False)
    empty = sitk.Image(lungs.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(lungs)
    burden = measure_burden(label, empty, (1,))
    assert burden.midline_x_mm is None
    assert burden.total == LungBurden(0.0, 0.0) and burden.total.percent == 0.0 and burden.right.grade == 0


@pytest.mark.parametrize(
    ("ggo_ml", "percent", "expected"),
    [
        (0.0, 0.0, 0),
        (0.1, 0.01, 1),
        (1.0, 4.99, 1),
        (1.0, 5.0, 2),
        (1.0, 25.0, 2),
        (1.0, 25.01, 3),
        (1.0, 50.0, 3),
        (1.0, 50.01, 4),
        (1.0, 75.0, 4),
        (1.0, 75.01, 5),
        (1.0, 100.0, 5),
    ],
)
def test_grade_bands(ggo_ml: float, percent: float, expected: int) -> None:
    assert grade(ggo_ml, percent) == expected


def test_json_form_round_trips(tmp_path: Path) -> None:
    burden = Burden(LungBurden(12.3456, 1800.0), LungBurden(0.0, 1500.0), 17.5)
    path = write_burden(burden, tmp_path / "out" / "scan.json")
    data = json.loads(path.read_text())
    assert data["right"] == {"ggo_ml": 12.346, "lung_ml": 1800.0, "percent": 0.686, "grade": 1}
    assert data["left"]["grade"] == 0 and "grade" not in data["total"]
    assert data["total"]["ggo_ml"] == pytest.approx(12.346) and "per lung" in data["grading"]
    again = Burden.from_dict(data)
    assert again.right.ggo_ml == pytest.approx(12.346) and again.midline_x_mm == 17.5
