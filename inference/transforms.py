"""Geometry and intensity transforms around the network, all driven by the spec.

- ``resample_to_spacing``: SimpleITK onto the spec's spacing, keeping origin and direction and covering the same
  physical extent (``round(size * spacing / new_spacing)`` voxels per axis), output float32.
- ``normalise_intensity``: window [a_min, a_max] -> [b_min, b_max], clipped, in place on a float32 array.
- ``restore_labels``: a label image on the model grid back onto exactly the input grid (size, spacing, origin,
  direction), nearest neighbour.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from inference.spec import IntensitySpec

_INTERPOLATORS = {
    "linear": sitk.sitkLinear,
    "nearest": sitk.sitkNearestNeighbor,
    "bspline": sitk.sitkBSpline,
}


def resampled_size(image: sitk.Image, spacing: Sequence[float]) -> tuple[int, int, int]:
    """Voxels per axis (x, y, z) that cover the image's physical extent at ``spacing``."""
    return tuple(  # type: ignore[return-value]
        max(1, round(n * s / t)) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing, strict=True)
    )


def resample_to_spacing(image: sitk.Image, spacing: Sequence[float], interpolation: str = "linear") -> sitk.Image:
    """Resample onto ``spacing`` (x, y, z mm) with the same origin and direction; float32 out.

    Points past the last input voxel centre (less than half an output voxel) take the nearest edge value
    rather than a fill value, so the border is not darkened.
    """
    spacing = tuple(float(s) for s in spacing)
    if tuple(image.GetSpacing()) == spacing:
        return image if image.GetPixelID() == sitk.sitkFloat32 else sitk.Cast(image, sitk.sitkFloat32)
    return sitk.Resample(
        image,
        resampled_size(image, spacing),
        sitk.Transform(),
        _INTERPOLATORS[interpolation],
        image.GetOrigin(),
        spacing,
        image.GetDirection(),
        0.0,
        sitk.sitkFloat32,
        True,
    )


def normalise_intensity(array: npt.NDArray[np.float32], spec: IntensitySpec) -> npt.NDArray[np.float32]:
    """``(clip(x, a_min, a_max) - a_min) / (a_max - a_min) * (b_max - b_min) + b_min``, in place; returns array."""
    if spec.clip:
        np.clip(array, spec.a_min, spec.a_max, out=array)
    scale = (spec.b_max - spec.b_min) / (spec.a_max - spec.a_min)
    np.subtract(array, np.float32(spec.a_min), out=array)
    np.multiply(array, np.float32(scale), out=array)
    if spec.b_min != 0.0:
        np.add(array, np.float32(spec.b_min), out=array)
    return array


def image_to_float32_array(image: sitk.Image) -> npt.NDArray[np.float32]:
    """A writable float32 (z, y, x) copy of a scalar image."""
    if image.GetPixelID() != sitk.sitkFloat32:
        image = sitk.Cast(image, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(image)


def label_image_on_grid(labels: npt.NDArray[np.uint8], grid: sitk.Image) -> sitk.Image:
    """Wrap a (z, y, x) uint8 array as an image with ``grid``'s spacing, origin and direction."""
    out = sitk.GetImageFromArray(labels, isVector=False)
    out.SetSpacing(grid.GetSpacing())
    out.SetOrigin(grid.GetOrigin())
    out.SetDirection(grid.GetDirection())
    return out


TIE_MARGIN = 1e-6
"""How close (in voxels) to a rounding tie or a grid edge a continuous index may come before the separable
restore of an oblique grid defers to SimpleITK (whose floating-point path then decides)."""


def _axis_index_map(labels: sitk.Image, reference: sitk.Image, axis: int) -> npt.NDArray[np.intp]:
    """SimpleITK's own nearest-neighbour source index along ``axis`` for each reference index along it (-1:
    outside, the default value), from a one-voxel-thick probe with both images' geometry."""
    n_in, n_out = labels.GetSize()[axis], reference.GetSize()[axis]
    in_size, out_size = [1, 1, 1], [1, 1, 1]
    in_size[axis], out_size[axis] = n_in, n_out
    ramp = np.arange(1, n_in + 1, dtype=np.uint32).reshape(tuple(reversed(in_size)))
    probe = sitk.GetImageFromArray(ramp, isVector=False)
    probe.SetOrigin(labels.GetOrigin())
    probe.SetSpacing(labels.GetSpacing())
    probe.SetDirection(labels.GetDirection())
    out = sitk.Resample(
        probe, out_size, sitk.Transform(), sitk.sitkNearestNeighbor, reference.GetOrigin(), reference.GetSpacing(),
        reference.GetDirection(), 0, sitk.sitkUInt32, True,
    )  # fmt: skip
    return sitk.GetArrayViewFromImage(out).reshape(-1).astype(np.intp) - 1


def _separable_restore(labels: sitk.Image, reference: sitk.Image) -> npt.NDArray[np.uint8] | None:
    """Nearest neighbour per axis when both grids share origin and direction (the model grid of
    ``resample_to_spacing``): index (i, j, k) of the reference reads (map_x[i], map_y[j], map_z[k]) of the labels.

    Axis-aligned directions: each per-axis map is SimpleITK's own (its continuous index along one axis involves no
    other axis: the direction's zeros are exact), so the result is SimpleITK's voxel for voxel. Oblique: the cross
    terms are rounding noise (about 1e-13 voxel), so the maps hold wherever no index comes within ``TIE_MARGIN``
    of a rounding tie or a grid edge; otherwise None (the caller resamples with SimpleITK).
    """
    if labels.GetOrigin() != reference.GetOrigin() or labels.GetDirection() != reference.GetDirection():
        return None
    direction = np.asarray(labels.GetDirection(), dtype=np.float64)
    if not np.all((direction == 0.0) | (np.abs(direction) == 1.0)):
        for n_in, n_out, s_in, s_out in zip(
            labels.GetSize(), reference.GetSize(), labels.GetSpacing(), reference.GetSpacing(), strict=True
        ):
            c = np.arange(n_out, dtype=np.float64) * (s_out / s_in)
            if np.any(np.abs(c - np.floor(c) - 0.5) < TIE_MARGIN) or np.any(np.abs(c - (n_in - 0.5)) < TIE_MARGIN):
                return None
    mx, my, mz = (_axis_index_map(labels, reference, axis) for axis in range(3))
    src = sitk.GetArrayViewFromImage(labels)  # (z, y, x)
    # np.take is several times faster than chained fancy indexing; x first, on the smaller array
    out: npt.NDArray[np.uint8] = np.take(src, np.maximum(mx, 0), axis=2)
    out = np.take(out, np.maximum(my, 0), axis=1)
    if not (len(mz) == src.shape[0] and np.array_equal(mz, np.arange(len(mz)))):
        out = np.take(out, np.maximum(mz, 0), axis=0)
    if (mz < 0).any():
        out[mz < 0] = 0
    if (my < 0).any():
        out[:, my < 0] = 0
    if (mx < 0).any():
        out[:, :, mx < 0] = 0
    return out


def restore_labels(labels: sitk.Image, reference: sitk.Image) -> sitk.Image:
    """Nearest-neighbour resample of ``labels`` onto exactly ``reference``'s grid; uint8 out.

    Only the reference's geometry is used (its pixels are not read). When the grids coincide the labels are
    returned as they are, with the reference's geometry copied bit for bit. When they share origin and direction
    (the model grid), per-axis index maps do it (``_separable_restore``, SimpleITK's result voxel for voxel);
    otherwise SimpleITK resamples.
    """
    if labels.GetPixelID() != sitk.sitkUInt8:
        labels = sitk.Cast(labels, sitk.sitkUInt8)
    if (
        labels.GetSize() == reference.GetSize()
        and labels.GetSpacing() == reference.GetSpacing()
        and labels.GetOrigin() == reference.GetOrigin()
        and labels.GetDirection() == reference.GetDirection()
    ):
        out = labels
    elif (fast := _separable_restore(labels, reference)) is not None:
        out = sitk.GetImageFromArray(fast, isVector=False)
    else:
        out = sitk.Resample(
            labels,
            reference.GetSize(),
            sitk.Transform(),
            sitk.sitkNearestNeighbor,
            reference.GetOrigin(),
            reference.GetSpacing(),
            reference.GetDirection(),
            0,
            sitk.sitkUInt8,
            True,
        )
    # Resample already sets this geometry; copy it again so it is the reference's, bit for bit.
    out.SetOrigin(reference.GetOrigin())
    out.SetSpacing(reference.GetSpacing())
    out.SetDirection(reference.GetDirection())
    return out
