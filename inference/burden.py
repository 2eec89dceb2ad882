"""Lesion burden of one volume: ground-glass volume, lung volume and percent involvement, per lung and for both,
with a grade per lung. The one place these numbers are computed; the node's job and file mode both call it.

- **Ground glass**: the voxels of the label image whose value is one of the ground-glass labels, counted on the
  label's own grid (the input's): volume = voxels x voxel volume, so it equals what a SEG of the same mask holds.
- **Lungs**: the pipeline's lung mask (``SegmentationResult.lung_mask``: the lung fields before their margin, on
  3.2 mm blocks), counted the same way on its grid. It includes the vessels and airways inside the lungs (holes
  are filled) and the partial blocks at the pleura, so it states the parenchyma a few percent high; the margin
  the pipeline grows around it (against cutting haze at the pleura) is not counted.
- **Right and left** are split in patient space, never by image side: one sagittal plane x = ``midline_x_mm``
  (LPS: x grows towards the patient's left), at the mediastinum, found as the least populated x of the lungs'
  profile along x (the lungs' voxel count per 1 mm of x, smoothed over 4 mm) between its 20th and 80th
  percentiles. The scanner's x = 0 is not used: the patient is rarely centred on it (lung1's mediastinum lies at
  x = +18 mm). Every voxel's x comes from the image's origin, spacing and direction, so flipped or oblique grids
  split the same way. One lung missing or the two fused across the midline are outside what this assumes.
- **Grade** per lung, from its percent p (the bands of the usual CT severity score, here per lung, not the
  25-point lobar score): 0 no ground glass; 1 p < 5; 2 5 <= p <= 25; 3 25 < p <= 50; 4 50 < p <= 75; 5 p > 75.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from inference.atomic import write_atomic

GROUND_GLASS_SEGMENT = "ground glass opacity"
"""The segment name (lower case) whose labels the burden counts."""

GRADE_BANDS: tuple[tuple[float, int], ...] = ((5.0, 1), (25.0, 2), (50.0, 3), (75.0, 4))
"""(upper bound of p, inclusive except for grade 1, grade); above the last bound: grade 5."""

GRADING = "per lung: 0 none, 1 < 5 %, 2 5-25 %, 3 26-50 %, 4 51-75 %, 5 > 75 % (not the 25-point lobar score)"

PROFILE_BIN_MM = 1.0
PROFILE_SMOOTH_MM = 4.0
MIDLINE_SEARCH = (20.0, 80.0)
"""Percentiles of the lungs' x between which the midline is looked for."""


def grade(ggo_ml: float, percent: float) -> int:
    """The grade of one lung (see the module docstring)."""
    if ggo_ml <= 0.0:
        return 0
    if percent < GRADE_BANDS[0][0]:
        return GRADE_BANDS[0][1]
    for upper, value in GRADE_BANDS[1:]:
        if percent <= upper:
            return value
    return 5


@dataclass(frozen=True, slots=True)
class LungBurden:
    """Ground glass in one lung (or both): volumes in mL."""

    ggo_ml: float
    lung_ml: float

    @property
    def percent(self) -> float:
        """Ground-glass volume as percent of the lung volume (0 without lung)."""
        return 100.0 * self.ggo_ml / self.lung_ml if self.lung_ml > 0 else 0.0

    @property
    def grade(self) -> int:
        return grade(self.ggo_ml, self.percent)

    def as_dict(self, *, graded: bool) -> dict[str, float | int]:
        out: dict[str, float | int] = {
            "ggo_ml": round(self.ggo_ml, 3),
            "lung_ml": round(self.lung_ml, 3),
            "percent": round(self.percent, 3),
        }
        if graded:
            out["grade"] = self.grade
        return out


@dataclass(frozen=True, slots=True)
class Burden:
    """The burden numbers of one job (see the module docstring)."""

    right: LungBurden
    left: LungBurden
    midline_x_mm: float | None
    """Where right and left were split (LPS x, mm); None when there was no lung to split."""

    @property
    def total(self) -> LungBurden:
        return LungBurden(self.right.ggo_ml + self.left.ggo_ml, self.right.lung_ml + self.left.lung_ml)

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (``<name>.json`` of file mode, ``jobs.burden`` of the node's database)."""
        return {
            "right": self.right.as_dict(graded=True),
            "left": self.left.as_dict(graded=True),
            "total": self.total.as_dict(graded=False),
            "midline_x_mm": None if self.midline_x_mm is None else round(self.midline_x_mm, 2),
            "grading": GRADING,
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Burden:
        def side(key: str) -> LungBurden:
            return LungBurden(float(data[key]["ggo_ml"]), float(data[key]["lung_ml"]))

        midline = data.get("midline_x_mm")
        return cls(side("right"), side("left"), None if midline is None else float(midline))

    def summary(self) -> str:
        """One line for a banner or a log."""
        t = self.total
        return (
            f"ground glass {t.ggo_ml:.1f} mL = {t.percent:.1f} % of {t.lung_ml:.0f} mL lung; "
            f"right {self.right.percent:.1f} % (grade {self.right.grade}), "
            f"left {self.left.percent:.1f} % (grade {self.left.grade})"
        )


def ground_glass_labels(segments: Iterable[Any]) -> tuple[int, ...]:
    """The label values of the model spec's ground-glass segments (objects with ``label`` and ``name``)."""
    return tuple(int(s.label) for s in segments if str(s.name).strip().lower() == GROUND_GLASS_SEGMENT)


def _x_mm(image: sitk.Image) -> tuple[float, npt.NDArray[np.float64]]:
    """Patient x of voxel (i, j, k) = x0 + c . (i, j, k): returns x0 and c (mm per index step along x, y, z)."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    steps = direction[0] * np.asarray(image.GetSpacing(), dtype=np.float64)
    return float(image.GetOrigin()[0]), steps


def _side_counts(array: npt.NDArray[Any], image: sitk.Image, midline: float, values: Sequence[int]) -> tuple[int, int]:
    """(voxels right of the midline, voxels left of it) whose value is one of ``values``, of ``array`` ((z, y, x)
    on ``image``'s grid); a slice at a time, so no volume-sized temporary is made."""
    x0, (cx, cy, cz) = _x_mm(image)
    nz, ny, nx = array.shape
    in_plane = x0 + cx * np.arange(nx)[None, :] + cy * np.arange(ny)[:, None]
    wanted = np.asarray(values, dtype=array.dtype)
    left = 0
    total = 0
    for k in range(nz):
        plane = array[k] == wanted[0] if wanted.size == 1 else np.isin(array[k], wanted)
        n = int(np.count_nonzero(plane))
        if n:
            total += n
            left += int(np.count_nonzero(plane & (in_plane + cz * k > midline)))
    return total - left, left


def midline_x_mm(lung: npt.NDArray[np.bool_], image: sitk.Image) -> float | None:
    """The sagittal plane between the lungs (see the module docstring); None without lung voxels."""
    k, j, i = np.nonzero(lung)
    if k.size == 0:
        return None
    x0, c = _x_mm(image)
    x = x0 + c[0] * i + c[1] * j + c[2] * k
    lo, hi = np.percentile(x, MIDLINE_SEARCH)
    edges = np.arange(float(x.min()), float(x.max()) + 2 * PROFILE_BIN_MM, PROFILE_BIN_MM)
    counts, _ = np.histogram(x, bins=edges)
    sigma = PROFILE_SMOOTH_MM / PROFILE_BIN_MM
    taps = np.arange(-math.ceil(3 * sigma), math.ceil(3 * sigma) + 1)
    kernel = np.exp(-0.5 * (taps / sigma) ** 2)
    profile = np.convolve(counts.astype(np.float64), kernel / kernel.sum(), mode="same")
    centres = (edges[:-1] + edges[1:]) / 2
    inside = (centres >= lo) & (centres <= hi)
    if not inside.any():
        return float(np.median(x))
    candidates = np.flatnonzero(inside)
    low = profile[candidates].min()
    lowest = candidates[np.isclose(profile[candidates], low, rtol=1e-9, atol=1e-12)]
    return float(centres[lowest].mean())


def _voxel_ml(image: sitk.Image) -> float:
    return float(np.prod(image.GetSpacing())) / 1000.0


def measure_burden(label: sitk.Image, lung_mask: sitk.Image, ggo_labels: Sequence[int]) -> Burden:
    """The burden of ``label`` (the label image on the input's grid) in ``lung_mask`` (the pipeline's lungs, on
    their own grid); ``ggo_labels``: the label values that are ground glass (``ground_glass_labels``)."""
    lung = sitk.GetArrayViewFromImage(lung_mask) > 0
    midline = midline_x_mm(lung, lung_mask)
    if midline is None:
        return Burden(LungBurden(0.0, 0.0), LungBurden(0.0, 0.0), None)
    lung_right, lung_left = _side_counts(lung, lung_mask, midline, (True,))
    ggo_right, ggo_left = (
        _side_counts(sitk.GetArrayViewFromImage(label), label, midline, ggo_labels) if ggo_labels else (0, 0)
    )
    lv, gv = _voxel_ml(lung_mask), _voxel_ml(label)
    return Burden(
        right=LungBurden(ggo_right * gv, lung_right * lv),
        left=LungBurden(ggo_left * gv, lung_left * lv),
        midline_x_mm=midline,
    )


def write_burden(burden: Burden, path: Path) -> Path:
    """``burden`` as JSON at ``path``, written atomically (not flushed: a derived file, written again by a
    re-run)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, [(burden.to_json() + "\n").encode("utf-8")], fsync=False)
    return path


__all__ = [
    "GRADING",
    "GROUND_GLASS_SEGMENT",
    "Burden",
    "LungBurden",
    "grade",
    "ground_glass_labels",
    "measure_burden",
    "midline_x_mm",
    "write_burden",
]
