"""Resampling a decoded stack onto a regular grid, and making it a SimpleITK image with its patient geometry.

The image: origin = the first slice's position, direction columns = row cosine, column cosine, normal (or the table
direction under gantry tilt); spacing = (column spacing dx, row spacing dy, slice step). Uneven steps are
interpolated linearly between neighbouring slices (:func:`regularize`); a sheared, gantry-tilted stack goes through
SimpleITK's resampler with the affine transform that undoes the shear (:func:`untilt`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from dicom_node.series.plan import Plan

PAD_HU = -1024.0
"""Value of resampled voxels that fall outside the acquired stack (air)."""


def regularize(volume: npt.NDArray[np.float32], t: npt.NDArray[np.float64], step: float) -> npt.NDArray[np.float32]:
    """Linear interpolation between neighbouring slices onto t[0] + m * step, m = 0..M (M * step <= span)."""
    count = math.floor((t[-1] - t[0]) / step + 1e-3) + 1
    grid = t[0] + step * np.arange(count)
    k = np.clip(np.searchsorted(t, grid, side="right") - 1, 0, len(t) - 2)
    w = ((grid - t[k]) / (t[k + 1] - t[k])).astype(np.float32)
    out = np.empty((count, *volume.shape[1:]), dtype=np.float32)
    for m in range(count):
        a, b = volume[k[m]], volume[k[m] + 1]
        if w[m] <= 0:
            out[m] = a
        elif w[m] >= 1:
            out[m] = b
        else:
            np.multiply(a, 1 - w[m], out=out[m])
            out[m] += w[m] * b
    return out


def image_from_array(array: npt.NDArray[np.float32], origin: Sequence[float], spacing: Sequence[float],
           direction: npt.NDArray[np.float64]) -> sitk.Image:  # fmt: skip
    image = sitk.GetImageFromArray(array, isVector=False)
    image.SetOrigin(tuple(float(v) for v in origin))
    image.SetSpacing(tuple(float(v) for v in spacing))
    image.SetDirection(tuple(float(v) for v in direction.ravel()))
    return image


def untilt(plan: Plan, volume: npt.NDArray[np.float32]) -> sitk.Image:
    """Resample a sheared (gantry-tilted) regular stack onto a grid orthogonal to the table direction.

    The sheared stack is x = p0 + i*dx*row + j*dy*col + m*step*s. Seen as an image with orthonormal direction
    (row, col, normal) and slice spacing step*(s.n), a point x of that stack sits at y = A (x - p0) + p0 with
    A = I - s_perp n^T / (s.n), s_perp = s - (s.n) n: an affine transform SimpleITK's resampler applies.
    """
    s, n, p0 = plan.stack_dir, plan.normal, plan.positions[0]
    sn = float(s @ n)
    s_perp = s - sn * n
    source = image_from_array(volume, p0, (plan.dx, plan.dy, plan.step * sn), np.column_stack([plan.row, plan.col, n]))
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(tuple(float(v) for v in (np.eye(3) - np.outer(s_perp, n) / sn).ravel()))
    transform.SetCenter(tuple(float(v) for v in p0))

    out_row = plan.row - (plan.row @ s) * s
    out_row /= np.linalg.norm(out_row)
    out_col = np.cross(s, out_row)
    direction = np.column_stack([out_row, out_col, s])
    slices, rows, cols = volume.shape
    edges = ((cols - 1) * plan.dx * plan.row, (rows - 1) * plan.dy * plan.col, (slices - 1) * plan.step * s)
    corners = np.array(
        [p0 + a * edges[0] + b * edges[1] + c * edges[2] for a in (0, 1) for b in (0, 1) for c in (0, 1)]
    )
    q = corners @ direction
    spacing = np.array([plan.dx, plan.dy, plan.step])
    qmin, qmax = q.min(axis=0), q.max(axis=0)
    size = [int(v) for v in np.floor((qmax - qmin) / spacing + 1e-3) + 1]
    origin = direction @ qmin
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize(size)
    resampler.SetOutputOrigin(tuple(float(v) for v in origin))
    resampler.SetOutputSpacing(tuple(float(v) for v in spacing))
    resampler.SetOutputDirection(tuple(float(v) for v in direction.ravel()))
    resampler.SetTransform(transform)
    resampler.SetInterpolator(sitk.sitkLinear)
    resampler.SetDefaultPixelValue(PAD_HU)
    resampler.SetOutputPixelType(sitk.sitkFloat32)
    result: sitk.Image = resampler.Execute(source)
    return result


def plan_image(plan: Plan, volume: npt.NDArray[np.float32]) -> sitk.Image:
    """The decoded stack of ``plan`` as an image on a regular grid (regularized, un-tilted where needed)."""
    if plan.regularize:
        volume = regularize(volume, plan.t, plan.step)
    if plan.tilted:
        return untilt(plan, volume)
    direction = np.column_stack([plan.row, plan.col, plan.normal])
    return image_from_array(volume, plan.positions[0], (plan.dx, plan.dy, plan.step), direction)


__all__ = ["PAD_HU", "image_from_array", "plan_image", "regularize", "untilt"]
