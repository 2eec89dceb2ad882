"""Per-frame header facts of CT instances (single-frame CT Image and multi-frame Enhanced CT), from headers only.

Shared by selection (which rules a series passes) and reconstruction (geometry and rescale of every frame), so
both read a frame's orientation, position, size and rescale the same way. For Enhanced CT the values come from
the per-frame functional groups, falling back to the shared ones (PS3.3 C.7.6.16).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicom_node.errors import Rejected
from dicom_node.types import SeriesManifest

ENHANCED_CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"


class HeaderError(ValueError):
    """A header lacks or garbles a value that geometry or rescale needs; the message names it."""


@dataclass(frozen=True, slots=True)
class FrameHeader:
    """One frame's geometry and rescale, as stored (before any sorting)."""

    frame_number: int | None
    """1-based frame number in a multi-frame instance; None for a single-frame instance."""
    orientation: tuple[float, float, float, float, float, float]
    position: tuple[float, float, float]
    rows: int
    columns: int
    pixel_spacing: tuple[float, float]
    """DICOM order: (row spacing = dy between rows, column spacing = dx between columns), mm."""
    slope: float
    intercept: float


def _floats(value: Any, n: int, name: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in (value if isinstance(value, Sequence) and not isinstance(value, str) else []))
    except (TypeError, ValueError) as exc:
        raise HeaderError(f"{name} is not numeric: {value!r}") from exc
    if len(values) != n:
        raise HeaderError(f"{name} must hold {n} numbers, got {value!r}")
    return values


def _item(ds: Dataset | None, sequence: str) -> Dataset | None:
    if ds is None:
        return None
    seq = ds.get(sequence)
    if not seq:
        return None
    first: Dataset = seq[0]
    return first


def _lookup(per_frame: Dataset | None, shared: Dataset | None, sequence: str, keyword: str) -> Any:
    for group in (per_frame, shared):
        item = _item(group, sequence)
        if item is not None and item.get(keyword) is not None:
            return item.get(keyword)
    return None


def number_of_frames(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames") or 1))
    except (TypeError, ValueError) as exc:
        raise HeaderError(f"NumberOfFrames is not a number: {ds.get('NumberOfFrames')!r}") from exc


def is_multiframe(ds: Dataset) -> bool:
    return "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds


def frame_headers(ds: Dataset) -> list[FrameHeader]:
    """Every frame's header facts, in stored frame order. Raises HeaderError naming the missing value."""
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError) as exc:
        raise HeaderError("Rows/Columns missing or not numbers") from exc
    if not is_multiframe(ds):
        if ds.get("ImageOrientationPatient") is None or ds.get("ImagePositionPatient") is None:
            raise HeaderError("ImageOrientationPatient/ImagePositionPatient missing")
        slope = ds.get("RescaleSlope")
        intercept = ds.get("RescaleIntercept")
        return [
            FrameHeader(
                frame_number=None,
                orientation=_floats(ds.ImageOrientationPatient, 6, "ImageOrientationPatient"),  # type: ignore[arg-type]
                position=_floats(ds.ImagePositionPatient, 3, "ImagePositionPatient"),  # type: ignore[arg-type]
                rows=rows,
                columns=columns,
                pixel_spacing=_floats(ds.get("PixelSpacing"), 2, "PixelSpacing"),  # type: ignore[arg-type]
                slope=float(slope) if slope is not None else 1.0,
                intercept=float(intercept) if intercept is not None else 0.0,
            )
        ]
    n = number_of_frames(ds)
    shared = _item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) not in (0, n):
        raise HeaderError(f"PerFrameFunctionalGroupsSequence has {len(per_frame)} items for {n} frames")
    out: list[FrameHeader] = []
    for k in range(n):
        pf: Dataset | None = per_frame[k] if per_frame else None
        orientation = _lookup(pf, shared, "PlaneOrientationSequence", "ImageOrientationPatient")
        position = _lookup(pf, shared, "PlanePositionSequence", "ImagePositionPatient")
        spacing = _lookup(pf, shared, "PixelMeasuresSequence", "PixelSpacing")
        slope = _lookup(pf, shared, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _lookup(pf, shared, "PixelValueTransformationSequence", "RescaleIntercept")
        if orientation is None or position is None:
            raise HeaderError(f"frame {k + 1}: Plane Orientation/Position functional group missing")
        out.append(
            FrameHeader(
                frame_number=k + 1,
                orientation=_floats(orientation, 6, f"frame {k + 1} ImageOrientationPatient"),  # type: ignore[arg-type]
                position=_floats(position, 3, f"frame {k + 1} ImagePositionPatient"),  # type: ignore[arg-type]
                rows=rows,
                columns=columns,
                pixel_spacing=_floats(spacing, 2, f"frame {k + 1} PixelSpacing"),  # type: ignore[arg-type]
                slope=float(slope) if slope is not None else 1.0,
                intercept=float(intercept) if intercept is not None else 0.0,
            )
        )
    return out


def first_orientation(ds: Dataset) -> tuple[float, ...] | None:
    """The orientation of the first frame, or None when the header has none (cheap: no per-frame walk)."""
    if not is_multiframe(ds):
        value = ds.get("ImageOrientationPatient")
    else:
        pf = ds.get("PerFrameFunctionalGroupsSequence") or []
        value = _lookup(pf[0] if pf else None, _item(ds, "SharedFunctionalGroupsSequence"),
                        "PlaneOrientationSequence", "ImageOrientationPatient")  # fmt: skip
    if value is None:
        return None
    try:
        return _floats(value, 6, "ImageOrientationPatient")
    except HeaderError:
        return None


def first_pixel_spacing(ds: Dataset) -> tuple[float, ...] | None:
    if not is_multiframe(ds):
        value = ds.get("PixelSpacing")
    else:
        pf = ds.get("PerFrameFunctionalGroupsSequence") or []
        value = _lookup(pf[0] if pf else None, _item(ds, "SharedFunctionalGroupsSequence"),
                        "PixelMeasuresSequence", "PixelSpacing")  # fmt: skip
    if value is None:
        return None
    try:
        return _floats(value, 2, "PixelSpacing")
    except HeaderError:
        return None


def read_headers(manifest: SeriesManifest) -> list[Dataset]:
    """Read every instance's header (stop before pixel data). Raises Rejected naming an unreadable instance."""
    out: list[Dataset] = []
    for record in manifest.instances:
        out.append(
            read_header(record.path, f"series {manifest.series_instance_uid}: instance {record.sop_instance_uid}")
        )
    return out


def read_header(path: Path, label: str) -> Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError, AttributeError) as exc:
        raise Rejected(f"{label} ({path.name}): cannot read the DICOM header: {type(exc).__name__}: {exc}") from exc
