"""Which complete series are processed: configurable rules on headers only (pixel data is never read here).

The rules run in a fixed order and the first that fails gives the reason; a series that fails is not an error:
the caller keeps it and records it as skipped with that reason.

1. ``modality``: every instance's Modality is in ``selection.modalities``.
2. ``image_type``: every instance's ImageType starts with ``selection.image_type`` (e.g. ORIGINAL\\PRIMARY).
3. ``axial``: the slice normal is within ``selection.axial_tolerance_deg`` of the head-foot axis.
4. ``min_slices``: at least ``selection.min_slices`` slices (frames, for Enhanced CT).
5. ``uniform``: one Rows/Columns/PixelSpacing across the series.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pydicom.dataset import Dataset

from dicom_node.series.geometry import axial_angle_deg
from dicom_node.series.headers import first_orientation, first_pixel_spacing, number_of_frames, read_headers
from dicom_node.settings import SelectionSection
from dicom_node.types import SeriesManifest

BACKSLASH = "\\"


@dataclass(frozen=True, slots=True)
class SelectionDecision:
    """The outcome of the rules for one series: selected, or the first failed rule and its reason."""

    series_instance_uid: str
    selected: bool
    rule: str | None = None
    """Name of the first failed rule (modality, image_type, axial, min_slices, uniform); None when selected."""
    reason: str = ""
    """Human-readable cause naming the series, e.g. "series 1.2.3: modality MR is not in [CT]"."""


def _values(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str | bytes):
        return [str(value).strip()]
    try:
        return [str(v).strip() for v in value]  # type: ignore[attr-defined]
    except TypeError:  # pragma: no cover - a single non-string value
        return [str(value).strip()]


def _label(ds: Dataset, index: int) -> str:
    sop = ds.get("SOPInstanceUID") or ""
    if not sop and hasattr(ds, "file_meta"):
        sop = ds.file_meta.get("MediaStorageSOPInstanceUID") or ""
    return f"instance {sop}" if sop else f"instance #{index + 1}"


def select_headers(series_uid: str, headers: Sequence[Dataset], rules: SelectionSection) -> SelectionDecision:
    """Apply the rules to the headers of one series (pure; no I/O)."""

    def fail(rule: str, cause: str) -> SelectionDecision:
        return SelectionDecision(series_uid, False, rule, f"series {series_uid}: {cause}")

    if not headers:
        return fail("min_slices", "no instances")
    allowed = [m.upper() for m in rules.modalities]
    for i, ds in enumerate(headers):
        modality = str(ds.get("Modality") or "").strip()
        if modality.upper() not in allowed:
            shown = modality or "(empty)"
            return fail("modality", f"modality {shown} is not in [{', '.join(rules.modalities)}] ({_label(ds, i)})")
    wanted = [v.upper() for v in rules.image_type]
    if wanted:
        for i, ds in enumerate(headers):
            image_type = [v.upper() for v in _values(ds.get("ImageType"))]
            if image_type[: len(wanted)] != wanted:
                have, need = BACKSLASH.join(image_type) or "(empty)", BACKSLASH.join(wanted)
                return fail("image_type", f"ImageType {have} does not start with {need} ({_label(ds, i)})")
    for i, ds in enumerate(headers):
        orientation = first_orientation(ds)
        if orientation is None:
            return fail("axial", f"no usable ImageOrientationPatient ({_label(ds, i)})")
        angle = axial_angle_deg(orientation)
        if angle > rules.axial_tolerance_deg:
            return fail(
                "axial",
                f"not axial: slice normal is {angle:.1f} deg from the head-foot axis "
                f"(tolerance {rules.axial_tolerance_deg:g} deg) ({_label(ds, i)})",
            )
    try:
        slices = sum(number_of_frames(ds) for ds in headers)
    except ValueError as exc:
        return fail("min_slices", str(exc))
    if slices < rules.min_slices:
        return fail("min_slices", f"{slices} slices, fewer than the {rules.min_slices} required")
    shapes: dict[tuple[object, object, tuple[float, ...] | None], int] = {}
    for i, ds in enumerate(headers):
        spacing = first_pixel_spacing(ds)
        key = (ds.get("Rows"), ds.get("Columns"), None if spacing is None else tuple(round(s, 4) for s in spacing))
        shapes.setdefault(key, i)
    if len(shapes) > 1:
        parts: list[str] = []
        for (r, c, sp), i in list(shapes.items())[:3]:
            at = "x".join(f"{s:g}" for s in sp) + " mm" if sp else "(no PixelSpacing)"
            parts.append(f"{r}x{c} at {at} ({_label(headers[i], i)})")
        return fail("uniform", f"Rows/Columns/PixelSpacing differ within the series: {'; '.join(parts)}")
    return SelectionDecision(series_uid, True)


def select_series(manifest: SeriesManifest, rules: SelectionSection) -> SelectionDecision:
    """Read the headers of a complete series and apply the rules. Raises Rejected for an unreadable instance."""
    return select_headers(manifest.series_instance_uid, read_headers(manifest), rules)
