"""All plane maths of the node, in one place: pure helpers on CT slice geometry (LPS millimetres). No I/O.

Sorting along the normal, gantry tilt, slice spacing (planning and completion) and the SEG's frames on the
source planes (the writer) all use these functions.

A slice's orientation is its ImageOrientationPatient: six direction cosines, the row direction (the direction in
which column index increases) then the column direction. The slice normal is row x column; a stack is sorted by
each slice position's projection on that normal (never by InstanceNumber).

Inputs are per slice (for a multi-frame instance: per frame), as plain float sequences, so the receiver can call
these on header values it already has and reconstruction can call them on the same values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from dicom_node.types import FramePlane

FloatArray = npt.NDArray[np.float64]
Points = Sequence[Sequence[float]] | FloatArray
"""Positions (n x 3) or orientations (n x 6): nested sequences or an array."""
Vector = Sequence[float] | FloatArray

ORIENTATION_TOLERANCE = 1e-3
"""Largest absolute difference of two direction cosines that still counts as the same orientation (about 0.06
degrees): decimal strings written by different scanners round cosines differently."""

LATERAL_TOLERANCE_MM = 0.05
"""Largest offset (mm) of a slice position off the line through the first position along the slice normal that
still counts as "stepping along the normal". Gantry tilt moves each slice sideways by step * tan(tilt) (0.38 mm
per 1.14 mm step at 18.5 degrees); decimal-string rounding of positions stays far below this."""

HEAD_FOOT_AXIS = np.array([0.0, 0.0, 1.0])


def orientation_vectors(orientation: Vector) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Row cosine, column cosine and unit slice normal (row x column) of an ImageOrientationPatient.

    Raises ValueError when the value does not hold six numbers or the two cosines are degenerate.
    """
    values = np.asarray([float(v) for v in orientation], dtype=np.float64)
    if values.shape != (6,) or not np.all(np.isfinite(values)):
        raise ValueError(f"ImageOrientationPatient must be six finite numbers, got {list(orientation)!r}")
    row, col = values[:3], values[3:]
    nr, nc = float(np.linalg.norm(row)), float(np.linalg.norm(col))
    if nr < 1e-6 or nc < 1e-6:
        raise ValueError(f"ImageOrientationPatient has a zero direction cosine: {list(orientation)!r}")
    row, col = row / nr, col / nc
    normal = np.cross(row, col)
    nn = float(np.linalg.norm(normal))
    if nn < 1e-3:
        raise ValueError(f"ImageOrientationPatient row and column cosines are parallel: {list(orientation)!r}")
    return row, col, normal / nn


def slice_normal(orientation: Vector) -> FloatArray:
    """Unit normal (row x column) of a slice with this ImageOrientationPatient."""
    return orientation_vectors(orientation)[2]


def positions_along(normal: Vector, positions: Points) -> FloatArray:
    """Each ImagePositionPatient projected on the slice normal (mm), in the order given."""
    p = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    return p @ np.asarray(normal, dtype=np.float64)


def same_orientation(orientations: Points, tolerance: float = ORIENTATION_TOLERANCE) -> bool:
    """True when every orientation equals the first within ``tolerance`` per direction cosine."""
    if len(orientations) == 0:
        return True
    o = np.asarray(orientations, dtype=np.float64).reshape(-1, 6)
    return bool(np.all(np.abs(o - o[0]) <= tolerance))


def axial_angle_deg(orientation: Vector) -> float:
    """Angle (0-90 degrees) between the slice normal and the patient's head-foot axis; 0 for a true axial slice."""
    normal = slice_normal(orientation)
    cos = min(1.0, abs(float(normal @ HEAD_FOOT_AXIS)))
    return math.degrees(math.acos(cos))


def lateral_offsets(normal: Vector, positions: Points) -> FloatArray:
    """Distance (mm) of each position from the line through the first position along the normal."""
    p = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    n = np.asarray(normal, dtype=np.float64)
    if len(p) == 0:
        return np.zeros(0)
    d = p - p[0]
    perpendicular = d - np.outer(d @ n, n)
    return np.asarray(np.linalg.norm(perpendicular, axis=1), dtype=np.float64)


def tilt_angle_deg(normal: Vector, positions: Points) -> float:
    """Angle (degrees) between the direction in which positions step (first to last along the normal) and the normal.

    0 for a regular stack; the gantry tilt for a sheared one (slices stepped along the table while the image plane
    is tilted). 0 when there are fewer than two distinct positions.
    """
    p = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    if len(p) < 2:
        return 0.0
    n = np.asarray(normal, dtype=np.float64)
    along = p @ n
    step = p[int(np.argmax(along))] - p[int(np.argmin(along))]
    length = float(np.linalg.norm(step))
    if length < 1e-9:
        return 0.0
    cos = min(1.0, abs(float(step @ n)) / length)
    return math.degrees(math.acos(cos))


def is_gantry_tilted(
    normal: Vector,
    positions: Points,
    lateral_tolerance_mm: float = LATERAL_TOLERANCE_MM,
) -> bool:
    """True when the positions do not step along the slice normal (a slice lies more than the tolerance off it)."""
    offsets = lateral_offsets(normal, positions)
    return bool(offsets.size and float(offsets.max()) > lateral_tolerance_mm)


@dataclass(frozen=True, slots=True)
class SpacingStats:
    """Steps between consecutive sorted slice positions along the normal."""

    count: int
    """Number of slices."""
    steps: tuple[float, ...]
    """Consecutive differences of the sorted positions (mm), len = count - 1."""
    median: float
    minimum: float
    maximum: float
    max_relative_deviation: float
    """Largest |step - median| / median (0 for fewer than two steps)."""
    duplicates: int
    """Steps of (nearly) zero length: two slices at one position."""
    gaps: tuple[int, ...]
    """Indices i of steps (between sorted slices i and i+1) longer than the median by more than the tolerance."""
    tolerance: float

    @property
    def even(self) -> bool:
        """Every step within the relative tolerance of the median, no duplicates."""
        return self.duplicates == 0 and self.max_relative_deviation <= self.tolerance

    def missing_slices(self) -> int:
        """Slices a regular stack at the median step would have in the gaps (rounded)."""
        if self.median <= 0:
            return 0
        return sum(max(0, round(self.steps[i] / self.median) - 1) for i in self.gaps)


DUPLICATE_STEP_MM = 1e-3
"""Two slices closer than this along the normal are at one position."""


def spacing_stats(along: Vector, tolerance: float = 0.1) -> SpacingStats:
    """Statistics of the steps between the positions along the normal (any order; they are sorted here).

    The median ignores duplicate (zero) steps, so a duplicated slice does not drag it to zero.
    """
    a = np.sort(np.asarray(along, dtype=np.float64).ravel())
    steps = np.diff(a)
    nonzero = steps[steps > DUPLICATE_STEP_MM]
    duplicates = int(np.sum(steps <= DUPLICATE_STEP_MM))
    if nonzero.size == 0:
        return SpacingStats(
            count=int(a.size), steps=tuple(float(s) for s in steps), median=0.0, minimum=0.0, maximum=0.0,
            max_relative_deviation=0.0, duplicates=duplicates, gaps=(), tolerance=tolerance,
        )  # fmt: skip
    median = float(np.median(nonzero))
    deviation = np.abs(nonzero - median) / median
    gaps = tuple(int(i) for i in np.nonzero(steps > median * (1.0 + tolerance))[0])
    return SpacingStats(
        count=int(a.size),
        steps=tuple(float(s) for s in steps),
        median=median,
        minimum=float(nonzero.min()),
        maximum=float(nonzero.max()),
        max_relative_deviation=float(deviation.max()),
        duplicates=duplicates,
        gaps=gaps,
        tolerance=tolerance,
    )


def is_regular_stack(
    orientations: Points,
    positions: Points,
    tolerance: float = 0.1,
) -> bool:
    """True when the slices form one contiguous, evenly spaced stack with no tilt or shear.

    One orientation for all (within ``ORIENTATION_TOLERANCE``); positions step along the slice normal (no gantry
    tilt); every step within ``tolerance`` (relative) of the median step; no two slices at one position; no gap.
    One slice is a (trivially) regular stack; none is not. Malformed orientations give False, never an exception.
    """
    if len(positions) == 0 or len(orientations) != len(positions):
        return False
    try:
        if not same_orientation(orientations):
            return False
        normal = slice_normal(orientations[0])
        p = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    except (ValueError, TypeError):
        return False
    if not np.all(np.isfinite(p)):
        return False
    if len(p) == 1:
        return True
    if is_gantry_tilted(normal, p):
        return False
    return spacing_stats(positions_along(normal, p), tolerance).even


def sort_along(normal: Vector, positions: Points) -> npt.NDArray[np.intp]:
    """The order that sorts slices by position along the normal (stable: equal positions keep their order)."""
    return np.argsort(positions_along(normal, positions), kind="stable")


def stack_direction(positions: Points) -> FloatArray:
    """Unit direction from the first to the last of positions already sorted along the normal (the table axis of
    a gantry-tilted stack)."""
    p = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    span = p[-1] - p[0]
    return np.asarray(span / np.linalg.norm(span), dtype=np.float64)


# -- frame planes against an image grid (the SEG's frames on the source planes) -----------------------------------


@dataclass(frozen=True, slots=True)
class Grid:
    """An image grid in patient space, ITK's convention: ``direction`` columns are the unit axes of x, y, z;
    ``spacing`` and ``size`` are in (x, y, z) order; a voxel index i maps to origin + direction @ (spacing * i)."""

    origin: FloatArray
    spacing: FloatArray
    direction: FloatArray
    size: tuple[int, int, int]

    @classmethod
    def of(cls, origin: Vector, spacing: Vector, direction: Vector, size: Sequence[int]) -> Grid:
        return cls(
            np.asarray(origin, dtype=np.float64),
            np.asarray(spacing, dtype=np.float64),
            np.asarray(direction, dtype=np.float64).reshape(3, 3),
            (int(size[0]), int(size[1]), int(size[2])),
        )


def plane_vectors(plane: FramePlane) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Position of the first pixel centre, and the steps (mm vectors) of one column and of one row."""
    row, col, _ = orientation_vectors(plane.orientation)
    dy, dx = plane.pixel_spacing
    return np.asarray(plane.position, dtype=np.float64), row * dx, col * dy


def planes_are_slices(planes: Sequence[FramePlane], grid: Grid, tolerance: float = 0.01) -> bool:
    """True when frame k of ``planes`` *is* slice k of ``grid``: the same in-plane grid, and each position within
    ``tolerance`` of a voxel of slice k. Then a label on the grid needs no resampling to lie on the frames."""
    if grid.size[2] != len(planes):
        return False
    for k, plane in enumerate(planes):
        if (plane.columns, plane.rows) != grid.size[:2]:
            return False
        position, step_c, step_r = plane_vectors(plane)
        if not (
            np.allclose(step_c, grid.direction[:, 0] * grid.spacing[0], rtol=0, atol=1e-4 * grid.spacing[0])
            and np.allclose(step_r, grid.direction[:, 1] * grid.spacing[1], rtol=0, atol=1e-4 * grid.spacing[1])
        ):
            return False
        expected = grid.origin + grid.direction[:, 2] * grid.spacing[2] * k
        if np.linalg.norm(position - expected) > tolerance * float(grid.spacing.min()):
            return False
    return True


class PlaneSampler:
    """Nearest-neighbour sampling of a (z, y, x) array on ``grid`` at the pixel centres of a frame plane.

    A point maps to the continuous index M (p - origin), M = (direction * spacing)^-1; nearest neighbour rounds
    half up (floor(x + 0.5), as ITK's NearestNeighborInterpolateImageFunction) and a point outside
    [-0.5, size - 0.5) on any axis samples the background 0 (as sitk.Resample's default value).
    """

    def __init__(self, array: npt.NDArray[np.uint8], grid: Grid) -> None:
        self.array = array
        self.grid = grid
        self.to_index = np.linalg.inv(grid.direction * grid.spacing)  # columns of direction scaled by spacing
        self.size = np.asarray(grid.size, dtype=np.int64)

    def sample(self, plane: FramePlane) -> npt.NDArray[np.uint8]:
        position, step_col, step_row = plane_vectors(plane)
        start = self.to_index @ (position - self.grid.origin)
        step_c = self.to_index @ step_col  # moving one column
        step_r = self.to_index @ step_row  # moving one row
        r = np.arange(plane.rows, dtype=np.float64)[:, None]
        c = np.arange(plane.columns, dtype=np.float64)[None, :]
        inside = np.ones((plane.rows, plane.columns), dtype=bool)
        idx: list[npt.NDArray[np.int64]] = []
        for axis in range(3):
            cont = start[axis] + c * step_c[axis] + r * step_r[axis]
            i = np.floor(cont + 0.5).astype(np.int64)
            inside &= (i >= 0) & (i < self.size[axis])
            idx.append(np.broadcast_to(i, inside.shape))
        out = np.zeros((plane.rows, plane.columns), dtype=np.uint8)
        if inside.any():
            x, y, z = (np.where(inside, i, 0) for i in idx)
            out[inside] = self.array[z[inside], y[inside], x[inside]]
        return out
