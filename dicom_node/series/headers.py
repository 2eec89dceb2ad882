"""The one header reader: a CT dataset -> its UIDs, the routing facts, and every frame's plane and rescale.

Every stage that needs a header fact asks this module, so each fact is derived once, one way, with one error
style: the receiver (UIDs and routing facts of a dataset parsed from the wire), start-up recovery (a spool file
without a row), selection, reconstruction and file mode (UIDs, frames), and through the volume's
:class:`~dicom_node.types.SourceInstance` records the SEG writer (each source frame's plane).

Single-frame CT Image and multi-frame Enhanced CT are read the same way: for Enhanced CT the values come from the
per-frame functional groups, falling back to the shared ones (PS3.3 C.7.6.16). Only headers are read here
(``stop_before_pixels``); pixel data is the decoder's business.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicom_node.errors import Rejected
from dicom_node.types import FramePlane, HeaderFacts, SeriesManifest, SourceInstance

ENHANCED_CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"

UID_CHARSET = re.compile(r"^[0-9.]{1,64}$")
"""What we accept as a UID at all: the UI repertoire and length (leading zeros, which some devices write, are
tolerated; a file name is never made from a UID without the spool's own key scheme)."""

READ_ERRORS = (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError, AttributeError)
"""What pydicom raises for a file that is not (or no longer) a readable DICOM dataset."""


class HeaderError(ValueError):
    """A header lacks or garbles a value that geometry or rescale needs; the message names it."""


# -- values -------------------------------------------------------------------------------------------------------


def clean_uid(value: object) -> str:
    """A UID value as sent, with the padding (trailing NUL / spaces) PS3.5 allows stripped."""
    if value is None:
        return ""
    return str(value).rstrip("\x00 ").strip()


def is_acceptable_uid(uid: str) -> bool:
    """True when ``uid`` only uses the UI repertoire and length; see :data:`UID_CHARSET`."""
    return bool(UID_CHARSET.match(uid)) and ".." not in uid and not uid.startswith(".") and not uid.endswith(".")


def floats(value: Any, n: int, name: str) -> tuple[float, ...]:
    """``n`` numbers from a multi-valued element; HeaderError naming the element otherwise."""
    try:
        values = tuple(float(v) for v in (value if isinstance(value, Sequence) and not isinstance(value, str) else []))
    except (TypeError, ValueError) as exc:
        raise HeaderError(f"{name} is not numeric: {value!r}") from exc
    if len(values) != n:
        raise HeaderError(f"{name} must hold {n} numbers, got {value!r}")
    return values


def _floats_or_none(value: Any, n: int) -> tuple[float, ...] | None:
    try:
        return floats(value, n, "value")
    except HeaderError:
        return None


def _int_or_none(value: Any) -> int | None:
    if value in (None, ""):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


# -- UIDs and routing facts ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InstanceUIDs:
    """The identifiers of one instance, each from the dataset, else its file meta, else the caller's fallback."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    transfer_syntax_uid: str

    def problem(self) -> str | None:
        """The first identifier that is empty or not a UID, said in one line; None when all four that route an
        instance (SOP class, SOP instance, study, series) are usable."""
        for name, value in (
            ("SOPClassUID", self.sop_class_uid),
            ("SOPInstanceUID", self.sop_instance_uid),
            ("StudyInstanceUID", self.study_instance_uid),
            ("SeriesInstanceUID", self.series_instance_uid),
        ):
            if not value:
                return f"{name} is empty in the dataset (and in the command)"
            if not is_acceptable_uid(value):
                return f"{name} {value[:80]!r} is not a valid UID (PS3.5 UI)"
        return None


def instance_uids(
    ds: Dataset, *, sop_class_uid: str = "", sop_instance_uid: str = "", transfer_syntax_uid: str = ""
) -> InstanceUIDs:
    """The UIDs of ``ds``. Where the dataset leaves SOP Class / Instance UID empty, the file meta's Media Storage
    values stand, then the given fallbacks (the C-STORE command's Affected SOP Class / Instance UID, or the
    database row's); the transfer syntax comes from the file meta, else the fallback."""
    meta = getattr(ds, "file_meta", None)

    def pick(keyword: str, meta_keyword: str | None, fallback: str) -> str:
        value = clean_uid(ds.get(keyword)) if keyword else ""
        if not value and meta is not None and meta_keyword:
            value = clean_uid(meta.get(meta_keyword))
        return value or clean_uid(fallback)

    return InstanceUIDs(
        sop_class_uid=pick("SOPClassUID", "MediaStorageSOPClassUID", sop_class_uid),
        sop_instance_uid=pick("SOPInstanceUID", "MediaStorageSOPInstanceUID", sop_instance_uid),
        study_instance_uid=clean_uid(ds.get("StudyInstanceUID")),
        series_instance_uid=clean_uid(ds.get("SeriesInstanceUID")),
        frame_of_reference_uid=clean_uid(ds.get("FrameOfReferenceUID")),
        transfer_syntax_uid=pick("", "TransferSyntaxUID", transfer_syntax_uid),
    )


def header_facts(ds: Dataset) -> HeaderFacts:
    """What the receive path records of an instance (never failing: an odd value is recorded as unknown)."""
    modality = ds.get("Modality")
    return HeaderFacts(
        modality=str(modality).strip() if modality else None,
        instance_number=_int_or_none(ds.get("InstanceNumber")),
        number_of_frames=_int_or_none(ds.get("NumberOfFrames")),
        position=_floats_or_none(ds.get("ImagePositionPatient"), 3),  # type: ignore[arg-type]
        orientation=_floats_or_none(ds.get("ImageOrientationPatient"), 6),  # type: ignore[arg-type]
    )


# -- frames -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FrameHeader:
    """One frame's plane and rescale, as stored (before any sorting)."""

    frame_number: int | None
    """1-based frame number in a multi-frame instance; None for a single-frame instance."""
    plane: FramePlane
    slope: float
    intercept: float


def functional_item(per_frame: Dataset | None, shared: Dataset | None, sequence: str) -> Dataset | None:
    """The item of a functional group macro for one frame: the per-frame group's first, else the shared one's."""
    for group in (per_frame, shared):
        seq = group.get(sequence) if group is not None else None
        if seq:
            item: Dataset = seq[0]
            return item
    return None


def _lookup(per_frame: Dataset | None, shared: Dataset | None, sequence: str, keyword: str) -> Any:
    for group in (per_frame, shared):
        item = functional_item(group, None, sequence)
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


def _plane(position: Any, orientation: Any, spacing: Any, rows: int, columns: int, what: str) -> FramePlane:
    return FramePlane(
        position=floats(position, 3, f"{what}ImagePositionPatient"),  # type: ignore[arg-type]
        orientation=floats(orientation, 6, f"{what}ImageOrientationPatient"),  # type: ignore[arg-type]
        pixel_spacing=floats(spacing, 2, f"{what}PixelSpacing"),  # type: ignore[arg-type]
        rows=rows,
        columns=columns,
    )


def _number(value: Any, default: float, name: str) -> float:
    if value is None or value == "":
        return default
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise HeaderError(f"{name} is not numeric: {value!r}") from exc


def frame_headers(ds: Dataset) -> list[FrameHeader]:
    """Every frame's plane and rescale, in stored frame order. Raises HeaderError naming the missing value."""
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError) as exc:
        raise HeaderError("Rows/Columns missing or not numbers") from exc
    if not is_multiframe(ds):
        if ds.get("ImageOrientationPatient") is None or ds.get("ImagePositionPatient") is None:
            raise HeaderError("ImageOrientationPatient/ImagePositionPatient missing")
        plane = _plane(ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.get("PixelSpacing"), rows, columns, "")
        return [
            FrameHeader(
                frame_number=None,
                plane=plane,
                slope=_number(ds.get("RescaleSlope"), 1.0, "RescaleSlope"),
                intercept=_number(ds.get("RescaleIntercept"), 0.0, "RescaleIntercept"),
            )
        ]
    n = number_of_frames(ds)
    shared = functional_item(ds, None, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) not in (0, n):
        raise HeaderError(f"PerFrameFunctionalGroupsSequence has {len(per_frame)} items for {n} frames")
    out: list[FrameHeader] = []
    for k in range(n):
        pf: Dataset | None = per_frame[k] if per_frame else None
        what = f"frame {k + 1} "
        orientation = _lookup(pf, shared, "PlaneOrientationSequence", "ImageOrientationPatient")
        position = _lookup(pf, shared, "PlanePositionSequence", "ImagePositionPatient")
        if orientation is None or position is None:
            raise HeaderError(f"frame {k + 1}: Plane Orientation/Position functional group missing")
        spacing = _lookup(pf, shared, "PixelMeasuresSequence", "PixelSpacing")
        slope = _lookup(pf, shared, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _lookup(pf, shared, "PixelValueTransformationSequence", "RescaleIntercept")
        out.append(
            FrameHeader(
                frame_number=k + 1,
                plane=_plane(position, orientation, spacing, rows, columns, what),
                slope=_number(slope, 1.0, f"{what}RescaleSlope"),
                intercept=_number(intercept, 0.0, f"{what}RescaleIntercept"),
            )
        )
    return out


def _first_frame_value(ds: Dataset, keyword: str, sequence: str, n: int) -> tuple[float, ...] | None:
    """A value of the first frame, or None when the header has none (cheap: no per-frame walk)."""
    if not is_multiframe(ds):
        value = ds.get(keyword)
    else:
        pf = ds.get("PerFrameFunctionalGroupsSequence") or []
        shared = functional_item(ds, None, "SharedFunctionalGroupsSequence")
        value = _lookup(pf[0] if pf else None, shared, sequence, keyword)
    return None if value is None else _floats_or_none(value, n)


def first_orientation(ds: Dataset) -> tuple[float, ...] | None:
    return _first_frame_value(ds, "ImageOrientationPatient", "PlaneOrientationSequence", 6)


def first_pixel_spacing(ds: Dataset) -> tuple[float, ...] | None:
    return _first_frame_value(ds, "PixelSpacing", "PixelMeasuresSequence", 2)


def source_frames(ds: Dataset, path: Path) -> tuple[SourceInstance, ...]:
    """The frames of one source instance as the records a volume lists (plane and header attached)."""
    uids = instance_uids(ds)
    try:
        frames = frame_headers(ds)
    except HeaderError as exc:
        raise Rejected(f"instance {uids.sop_instance_uid} ({path.name}): {exc}") from exc
    return tuple(
        SourceInstance(uids.sop_class_uid, uids.sop_instance_uid, path, f.frame_number, f.plane, ds) for f in frames
    )


# -- files --------------------------------------------------------------------------------------------------------


def read_header(path: Path, label: str) -> Dataset:
    """The header of one file (stop before pixel data); ``Rejected`` naming ``label`` and the cause."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except READ_ERRORS as exc:
        raise Rejected(f"{label} ({path.name}): cannot read the DICOM header: {type(exc).__name__}: {exc}") from exc


def read_headers(manifest: SeriesManifest) -> list[Dataset]:
    """Every instance's header, in manifest order. Raises Rejected naming an unreadable instance."""
    series = manifest.series_instance_uid
    return [read_header(r.path, f"series {series}: instance {r.sop_instance_uid}") for r in manifest.instances]
