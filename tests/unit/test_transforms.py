"""Resampling onto the spec's spacing, intensity windowing, and restoring labels onto exactly the input grid."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import SimpleITK as sitk

from inference.spec import IntensitySpec
from inference.transforms import (
    _separable_restore,
    normalise_intensity,
    resample_to_spacing,
    resampled_size,
    restore_labels,
)
from inference.volume_io import read_volume
from inference.writers import write_label


def oblique_direction() -> tuple[float, ...]:
    a, b = math.radians(17.0), math.radians(-9.0)
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    return tuple((rz @ rx).ravel().tolist())


def ct_like(size: tuple[int, int, int] = (61, 47, 13), direction: tuple[float, ...] | None = None) -> sitk.Image:
    rng = np.random.default_rng(0)
    arr = rng.integers(-1024, 800, size=size[::-1], dtype=np.int16)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((0.6640625, 0.6640625, 2.5))
    img.SetOrigin((-170.16999999999999, -301.3300000000001, -1234.5678901234))
    if direction is not None:
        img.SetDirection(direction)
    return img


def _same_grid(a: sitk.Image, b: sitk.Image) -> bool:
    return (
        a.GetSize() == b.GetSize()
        and a.GetSpacing() == b.GetSpacing()
        and a.GetOrigin() == b.GetOrigin()
        and a.GetDirection() == b.GetDirection()
    )


def test_resample_keeps_origin_direction_and_extent() -> None:
    img = ct_like(direction=oblique_direction())
    out = resample_to_spacing(img, (0.8, 0.8, 5.0))
    assert out.GetOrigin() == img.GetOrigin()
    assert out.GetDirection() == img.GetDirection()
    assert out.GetSpacing() == (0.8, 0.8, 5.0)
    assert out.GetSize() == resampled_size(img, (0.8, 0.8, 5.0)) == (51, 39, 6)
    assert out.GetPixelID() == sitk.sitkFloat32
    for n, s, m, t in zip(img.GetSize(), img.GetSpacing(), out.GetSize(), out.GetSpacing(), strict=True):
        assert abs(n * s - m * t) <= t / 2 + 1e-9


def test_resample_is_linear_interpolation() -> None:
    arr = np.tile(np.arange(20, dtype=np.float32) * 10.0, (4, 6, 1))  # value = 10 * x index
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.0, 1.0, 1.0))
    out = sitk.GetArrayFromImage(resample_to_spacing(img, (0.5, 1.0, 1.0)))
    np.testing.assert_allclose(out[0, 0, :39], np.arange(39) * 5.0, rtol=1e-6)


def test_normalise_clips_and_scales() -> None:
    spec = IntensitySpec(a_min=-1000.0, a_max=500.0, b_min=0.0, b_max=1.0, clip=True)
    x = np.array([-3000.0, -1000.0, -250.0, 500.0, 2000.0], dtype=np.float32)
    out = normalise_intensity(x, spec)
    assert out is x
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-7)
    y = normalise_intensity(np.array([-1000.0, 500.0], dtype=np.float32), IntensitySpec(-1000, 500, -1, 1, False))
    np.testing.assert_allclose(y, [-1.0, 1.0], atol=1e-6)


@pytest.mark.parametrize("direction", [None, "oblique"])
def test_restore_gives_exactly_the_input_grid(direction: str | None) -> None:
    img = ct_like(direction=oblique_direction() if direction else None)
    model = resample_to_spacing(img, (0.8, 0.8, 5.0))
    labels = sitk.Cast(model > 0, sitk.sitkUInt8)
    restored = restore_labels(labels, img)
    assert _same_grid(restored, img)
    assert restored.GetPixelID() == sitk.sitkUInt8
    # Nearest neighbour: only label values that exist, and the fraction is about the same.
    values = np.unique(sitk.GetArrayViewFromImage(restored))
    assert set(values.tolist()) <= {0, 1}


def test_restore_round_trip_is_identity_on_the_same_grid() -> None:
    img = ct_like(direction=oblique_direction())
    labels = sitk.Cast(img > 0, sitk.sitkUInt8)
    restored = restore_labels(labels, img)
    assert np.array_equal(sitk.GetArrayViewFromImage(restored), sitk.GetArrayViewFromImage(labels))


def test_restore_maps_through_physical_space_with_oblique_direction() -> None:
    """A label painted in physical space on the model grid lands at the same physical place on the input grid."""
    img = ct_like(size=(80, 70, 20), direction=oblique_direction())
    model = resample_to_spacing(img, (0.8, 0.8, 5.0))
    centre = img.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in img.GetSize()])
    idx = np.indices(model.GetSize()[::-1]).reshape(3, -1)[::-1].T  # (x, y, z) index of every model voxel
    d = np.array(model.GetDirection()).reshape(3, 3)
    pts = np.asarray(model.GetOrigin()) + (idx * np.asarray(model.GetSpacing())) @ d.T
    inside = np.linalg.norm(pts - np.asarray(centre), axis=1) < 15.0
    labels = sitk.GetImageFromArray(inside.reshape(model.GetSize()[::-1]).astype(np.uint8))
    labels.CopyInformation(model)
    restored = restore_labels(labels, img)
    ridx = np.argwhere(sitk.GetArrayViewFromImage(restored) > 0)[:, ::-1]
    rd = np.array(img.GetDirection()).reshape(3, 3)
    rpts = np.asarray(img.GetOrigin()) + (ridx * np.asarray(img.GetSpacing())) @ rd.T
    dist = np.linalg.norm(rpts - np.asarray(centre), axis=1)
    assert len(dist) > 100
    assert dist.max() < 15.0 + 3.0  # within one model voxel diagonal of the sphere


def _sitk_nearest(labels: sitk.Image, reference: sitk.Image) -> npt.NDArray[np.uint8]:
    out = sitk.Resample(
        labels, reference.GetSize(), sitk.Transform(), sitk.sitkNearestNeighbor, reference.GetOrigin(),
        reference.GetSpacing(), reference.GetDirection(), 0, sitk.sitkUInt8, True,
    )  # fmt: skip
    return sitk.GetArrayFromImage(out)


def _random_labels_on(model: sitk.Image, seed: int) -> sitk.Image:
    rng = np.random.default_rng(seed)
    labels = sitk.GetImageFromArray(rng.integers(0, 3, model.GetSize()[::-1], dtype=np.uint8))
    labels.CopyInformation(model)
    return labels


SEPARABLE_CASES = [
    # (size, input spacing, model spacing, direction)
    ((61, 47, 13), (0.6640625, 0.6640625, 2.5), (0.8, 0.8, 5.0), None),
    ((64, 33, 17), (0.703125, 0.703125, 1.25), (0.8, 0.8, 5.0), None),  # dyadic spacings: exact rounding ties
    ((37, 29, 11), (0.75, 0.5, 3.0), (1.5, 1.0, 2.0), None),  # ties on every axis
    ((50, 41, 23), (0.977, 0.977, 3.0), (0.8, 0.8, 5.0), (-1.0, 0, 0, 0, -1.0, 0, 0, 0, 1.0)),
    ((23, 31, 19), (1.1, 0.9, 0.7), (0.8, 1.3, 5.0), (0, 0, 1.0, 1.0, 0, 0, 0, 1.0, 0)),  # a permutation
    ((41, 37, 15), (0.977, 0.977, 3.0), (0.8, 0.8, 5.0), "oblique"),
    ((33, 27, 9), (0.703125, 0.703125, 2.5), (0.8, 0.8, 5.0), "oblique"),  # ties: SimpleITK decides
]


@pytest.mark.parametrize("case", range(len(SEPARABLE_CASES)))
def test_separable_restore_equals_simpleitk_voxel_for_voxel(case: int) -> None:
    size, spacing, model_spacing, direction = SEPARABLE_CASES[case]
    img = ct_like(size=size, direction=oblique_direction() if direction == "oblique" else direction)  # type: ignore[arg-type]
    img.SetSpacing(spacing)
    model = resample_to_spacing(img, model_spacing)
    labels = _random_labels_on(model, case)
    restored = restore_labels(labels, img)
    assert _same_grid(restored, img)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(restored), _sitk_nearest(labels, img))


def test_separable_restore_is_used_where_it_is_exact() -> None:
    img = ct_like(size=(64, 33, 17))
    img.SetSpacing((0.703125, 0.703125, 1.25))
    model = resample_to_spacing(img, (0.8, 0.8, 5.0))
    assert _separable_restore(_random_labels_on(model, 0), img) is not None
    oblique = ct_like(size=(33, 27, 9), direction=oblique_direction())
    oblique.SetSpacing((0.703125, 0.703125, 2.5))
    model = resample_to_spacing(oblique, (0.8, 0.8, 5.0))
    assert _separable_restore(_random_labels_on(model, 0), oblique) is None  # a tie on an oblique grid
    shifted = sitk.Image(model)
    shifted.SetOrigin(tuple(v + 0.1 for v in model.GetOrigin()))
    assert _separable_restore(_random_labels_on(shifted, 0), img) is None  # not the model grid of img


def test_separable_restore_matches_simpleitk_on_many_random_grids() -> None:
    rng = np.random.default_rng(7)
    spacings = [0.5, 0.6640625, 0.703125, 0.75, 0.8, 0.977, 1.0, 1.25, 1.5, 2.5, 3.0, 5.0]
    for trial in range(60):
        size = tuple(int(v) for v in rng.integers(2, 30, 3))
        direction = oblique_direction() if trial % 4 == 0 else None
        img = ct_like(size=size, direction=direction)  # type: ignore[arg-type]
        img.SetSpacing(tuple(float(v) for v in rng.choice(spacings, 3)))
        model = resample_to_spacing(img, tuple(float(v) for v in rng.choice([0.8, 1.0, 1.5, 2.0, 5.0], 3)))
        labels = _random_labels_on(model, trial)
        restored = restore_labels(labels, img)  # held: an array view does not keep its image alive
        np.testing.assert_array_equal(
            sitk.GetArrayViewFromImage(restored), _sitk_nearest(labels, img), err_msg=str(trial)
        )


@pytest.mark.parametrize("fmt", ["nii.gz", "nii", "mhd"])
def test_geometry_survives_the_file_round_trip(tmp_path: Path, fmt: str) -> None:
    """Read an input file, restore labels onto it, write the .mhd: the mask reads back on the input's grid."""
    src = tmp_path / "in"
    src.mkdir()
    sitk.WriteImage(ct_like(direction=oblique_direction()), str(src / f"vol.{fmt}"))
    vol = read_volume(src)
    model = resample_to_spacing(vol.image, (0.8, 0.8, 5.0))
    restored = restore_labels(sitk.Cast(model > 0, sitk.sitkUInt8), vol.image)
    header = write_label(restored, tmp_path / "out", vol.name)
    back = sitk.ReadImage(str(header))
    assert _same_grid(back, vol.image)
    assert np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(restored))
