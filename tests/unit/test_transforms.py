"""Resampling onto the spec's spacing, intensity windowing, and restoring labels onto exactly the input grid."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from inference.spec import IntensitySpec
from inference.transforms import normalise_intensity, resample_to_spacing, resampled_size, restore_labels
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
