"""Label image + source headers -> one DICOM Segmentation (BINARY) file, with highdicom.

What the SEG holds (see README "The SEG the node writes"):

- one segment per entry of the model spec's ``segments``, coded with SNOMED CT (``SEGMENT_CODES``), algorithm
  type AUTOMATIC, algorithm identification (family "Artificial Intelligence", model name and version);
- frames on the *source* planes: for every source frame (a slice, or a frame of an Enhanced CT instance) the
  label is sampled at that frame's pixel centres by geometry (nearest neighbour), so the SEG lies exactly on the
  images the PACS holds even when reconstruction resampled the volume (gantry tilt, uneven steps); frames whose
  mask is empty are left out unless ``seg.include_empty_frames``;
- "no finding": a mask with no voxel still gives a SEG, holding exactly one empty frame at the first source plane
  (highdicom, like the standard, needs at least one frame); ``segment_voxels == 0`` in the ``SegArtifact``;
- UIDs derived from the input, so a re-run of the same series with the same model replaces its SEG instead of
  duplicating it: series UID from (source series UID, model name, model version), SOP instance UID from (that
  series UID, the sorted source SOP instance UIDs and frame numbers).

Source headers are read with ``stop_before_pixels``: highdicom needs no pixel data of the sources.
"""

from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node import __version__
from dicom_node.errors import Rejected
from dicom_node.settings import SegSection
from dicom_node.types import CTVolume, SegArtifact, SourceInstance

log = logging.getLogger("dicom_node.seg")

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"

MORPHOLOGICALLY_ABNORMAL_STRUCTURE = Code("49755003", "SCT", "Morphologically abnormal structure")
"""CID 7150 "Segmentation Property Categories"."""
GROUND_GLASS_OPACITY = Code("1217294009", "SCT", "Ground glass opacity")
"""SNOMED CT "Ground glass opacity (finding)" (international release 2021-07 on). The older DICOM-only code
(DCM 112120, CID 6102/6104) is not used: the issue asks for SNOMED CT."""
LUNG = Code("39607008", "SCT", "Lung")
"""Anatomic region (CID 4 / CID 4031)."""
ARTIFICIAL_INTELLIGENCE = Code("123110", "DCM", "Artificial Intelligence")
"""Algorithm family (CID 7162)."""


@dataclass(frozen=True, slots=True)
class SegmentCoding:
    category: Code
    type: Code
    anatomic_region: Code | None
    display_lab: tuple[float, float, float]


SEGMENT_CODES: Mapping[str, SegmentCoding] = {
    "ground glass opacity": SegmentCoding(
        category=MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
        type=GROUND_GLASS_OPACITY,
        anatomic_region=LUNG,
        display_lab=(80.0, 10.0, 80.0),  # yellow-orange
    ),
}
"""Segment names the node knows how to code (lower case). A model spec naming another segment is refused."""


class SegmentLike(Protocol):
    """What the writer needs of a segment of the model spec (``inference.spec.SegmentSpec``)."""

    @property
    def label(self) -> int: ...

    @property
    def name(self) -> str: ...


UIDS_ROOT = "2.25."


def derived_uid(*parts: str) -> str:
    """A UID under 2.25 (UUID-derived arc) from a SHA-256 of the parts: the same input gives the same UID."""
    digest = hashlib.sha256("\x1f".join(parts).encode("utf-8")).hexdigest()
    return UIDS_ROOT + str(int(digest[:32], 16))


def seg_series_uid(source_series_uid: str, model_name: str, model_version: str) -> str:
    return derived_uid("dicom-node seg series", source_series_uid, model_name, model_version)


def seg_instance_uid(series_uid: str, sources: Sequence[SourceInstance]) -> str:
    keys = sorted(f"{s.sop_instance_uid}#{s.frame_number or 0}" for s in sources)
    return derived_uid("dicom-node seg instance", series_uid, *keys)


# --------------------------------------------------------------------------------------------------- geometry


@dataclass(frozen=True, slots=True)
class FramePlane:
    """Where one source frame's pixels lie: position of the first pixel centre, unit row/column directions
    (ImageOrientationPatient), and spacing between columns / between rows (mm)."""

    position: npt.NDArray[np.float64]
    row_dir: npt.NDArray[np.float64]
    col_dir: npt.NDArray[np.float64]
    column_spacing: float
    row_spacing: float
    rows: int
    columns: int


def _floats(values: object, n: int, what: str) -> npt.NDArray[np.float64]:
    try:
        arr = np.asarray([float(v) for v in values], dtype=np.float64)  # type: ignore[attr-defined]
    except (TypeError, ValueError) as exc:
        raise Rejected(f"{what}: not {n} numbers: {values!r}") from exc
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise Rejected(f"{what}: not {n} finite numbers: {values!r}")
    return arr


def _plane(position: object, orientation: object, spacing: object, rows: int, columns: int, what: str) -> FramePlane:
    ipp = _floats(position, 3, f"{what} ImagePositionPatient")
    iop = _floats(orientation, 6, f"{what} ImageOrientationPatient")
    ps = _floats(spacing, 2, f"{what} PixelSpacing")
    row_dir = iop[:3] / np.linalg.norm(iop[:3])
    col_dir = iop[3:] / np.linalg.norm(iop[3:])
    # PixelSpacing = (spacing between rows, spacing between columns)
    return FramePlane(ipp, row_dir, col_dir, float(ps[1]), float(ps[0]), int(rows), int(columns))


def _functional_item(ds: Dataset, frame_number: int, keyword: str) -> Dataset | None:
    """The item of a functional group macro for a frame: per-frame first, then shared."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and len(per_frame) >= frame_number:
        seq = per_frame[frame_number - 1].get(keyword)
        if seq:
            return seq[0]  # type: ignore[no-any-return]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        seq = shared[0].get(keyword)
        if seq:
            return seq[0]  # type: ignore[no-any-return]
    return None


def frame_plane(ds: Dataset, frame_number: int | None, what: str) -> FramePlane:
    """The plane of a single-frame image, or of one frame (1-based) of a multi-frame image."""
    if frame_number is None:
        return _plane(
            ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient"), ds.get("PixelSpacing"),
            ds.Rows, ds.Columns, what,
        )  # fmt: skip
    pos = _functional_item(ds, frame_number, "PlanePositionSequence")
    ori = _functional_item(ds, frame_number, "PlaneOrientationSequence")
    meas = _functional_item(ds, frame_number, "PixelMeasuresSequence")
    if pos is None or ori is None or meas is None:
        raise Rejected(f"{what} frame {frame_number}: no plane position, orientation or pixel measures")
    return _plane(
        pos.get("ImagePositionPatient"), ori.get("ImageOrientationPatient"), meas.get("PixelSpacing"),
        ds.Rows, ds.Columns, f"{what} frame {frame_number}",
    )  # fmt: skip


class _LabelSampler:
    """Nearest-neighbour sampling of a label image at arbitrary patient points, ITK's convention.

    A point maps to the continuous index M (p - origin), M = (direction * spacing)^-1; nearest neighbour rounds
    half up (floor(x + 0.5), as ITK's NearestNeighborInterpolateImageFunction) and a point outside
    [-0.5, size - 0.5) on any axis samples the background 0 (as sitk.Resample's default value).
    """

    def __init__(self, label: sitk.Image) -> None:
        self.array = sitk.GetArrayViewFromImage(label)  # (z, y, x)
        direction = np.asarray(label.GetDirection(), dtype=np.float64).reshape(3, 3)
        spacing = np.asarray(label.GetSpacing(), dtype=np.float64)
        self.origin = np.asarray(label.GetOrigin(), dtype=np.float64)
        self.to_index = np.linalg.inv(direction * spacing)  # columns of direction scaled by spacing
        self.size = np.asarray(label.GetSize(), dtype=np.int64)  # (x, y, z)

    def plane(self, plane: FramePlane) -> npt.NDArray[np.uint8]:
        start = self.to_index @ (plane.position - self.origin)
        step_c = self.to_index @ (plane.row_dir * plane.column_spacing)  # moving one column
        step_r = self.to_index @ (plane.col_dir * plane.row_spacing)  # moving one row
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


def _direct_slices(volume: CTVolume, planes: Sequence[FramePlane]) -> bool:
    """True when the volume's slice k *is* source frame k (no resampling): same in-plane grid, and each source
    position within 1 % of a voxel of the volume's slice k. Then the label's slice k is the source's mask."""
    image = volume.image
    if volume.resampled or image.GetSize()[2] != len(planes):
        return False
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    origin = np.asarray(image.GetOrigin(), dtype=np.float64)
    nx, ny = image.GetSize()[0], image.GetSize()[1]
    for k, p in enumerate(planes):
        if (p.columns, p.rows) != (nx, ny):
            return False
        if not (
            np.allclose(p.row_dir, direction[:, 0], atol=1e-4) and np.allclose(p.col_dir, direction[:, 1], atol=1e-4)
        ):
            return False
        if (
            abs(p.column_spacing - spacing[0]) > 1e-4 * spacing[0]
            or abs(p.row_spacing - spacing[1]) > 1e-4 * spacing[1]
        ):
            return False
        expected = origin + direction[:, 2] * spacing[2] * k
        if np.linalg.norm(p.position - expected) > 0.01 * float(spacing.min()):
            return False
    return True


# ---------------------------------------------------------------------------------------------------- writer


def _read_headers(sources: Sequence[SourceInstance], cache: Mapping[Path, Dataset] | None) -> dict[Path, Dataset]:
    out: dict[Path, Dataset] = {}
    for s in sources:
        if s.path in out:
            continue
        if cache is not None and s.path in cache:
            out[s.path] = cache[s.path]
            continue
        try:
            out[s.path] = pydicom.dcmread(s.path, stop_before_pixels=True)
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            raise Rejected(f"SEG: cannot read source header {s.path}: {exc}") from exc
    return out


def _segment_descriptions(
    segments: Sequence[SegmentLike], algorithm_name: str, algorithm_version: str
) -> tuple[list[hd.seg.SegmentDescription], dict[int, int]]:
    """Segment descriptions numbered 1..n in spec order, and label value -> segment number."""
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name, family=ARTIFICIAL_INTELLIGENCE, version=algorithm_version, source="dicom-node"
    )
    descriptions: list[hd.seg.SegmentDescription] = []
    numbers: dict[int, int] = {}
    for number, segment in enumerate(sorted(segments, key=lambda s: s.label), start=1):
        coding = SEGMENT_CODES.get(segment.name.strip().lower())
        if coding is None:
            known = ", ".join(sorted(SEGMENT_CODES))
            raise ValueError(f"segment {segment.name!r} (label {segment.label}) has no coding; known: {known}")
        if segment.label <= 0 or segment.label > 255:
            raise ValueError(f"segment {segment.name!r}: label {segment.label} is not in 1..255")
        numbers[segment.label] = number
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=segment.name[:64],
                segmented_property_category=coding.category,
                segmented_property_type=coding.type,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                anatomic_regions=[coding.anatomic_region] if coding.anatomic_region else None,
                display_color=hd.color.CIELabColor(*coding.display_lab),
            )
        )
    if not descriptions:
        raise ValueError("SEG: the model spec names no segment")
    return descriptions, numbers


def _check_label(volume: CTVolume, label: sitk.Image) -> None:
    image = volume.image
    if label.GetDimension() != 3 or label.GetSize() != image.GetSize():
        raise Rejected(f"SEG: label size {label.GetSize()} differs from the volume's {image.GetSize()}")
    same = (
        np.allclose(label.GetOrigin(), image.GetOrigin(), atol=1e-3)
        and np.allclose(label.GetSpacing(), image.GetSpacing(), rtol=1e-5)
        and np.allclose(label.GetDirection(), image.GetDirection(), atol=1e-5)
    )
    if not same:
        raise Rejected("SEG: the label image is not on the volume's grid (origin, spacing or direction differ)")


TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
"""Patient and study attributes highdicom copies from the first source; Type 2 in the SEG, so an absent one is
copied as empty rather than failing the run."""


def _with_type2(ds: Dataset) -> Dataset:
    missing = [k for k in TYPE2_COPIED if k not in ds]
    if not missing:
        return ds
    patched = copy.deepcopy(ds)
    for keyword in missing:
        setattr(patched, keyword, "")
    return patched


def _repair_copied_patient_module(ds: Dataset) -> None:
    """De-identified sources often say PatientIdentityRemoved YES but leave DeidentificationMethod (Type 1C)
    empty; copied as is, the SEG would fail validation. Say that the method is not known rather than drop the
    flag."""
    if str(ds.get("PatientIdentityRemoved", "")).upper() == "YES" and not (
        ds.get("DeidentificationMethod") or ds.get("DeidentificationMethodCodeSequence")
    ):
        ds.DeidentificationMethod = "Not stated in the source images"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_seg(
    volume: CTVolume,
    label: sitk.Image,
    *,
    segments: Sequence[SegmentLike],
    algorithm_name: str,
    algorithm_version: str,
    seg: SegSection,
    out_path: Path,
    headers: Mapping[Path, Dataset] | None = None,
    now: _dt.datetime | None = None,
) -> SegArtifact:
    """Write the SEG of ``label`` (uint8 on ``volume.image``'s grid) for ``volume``'s sources to ``out_path``.

    ``segments``: the model spec's segments (label value + name); ``algorithm_name``/``algorithm_version``: the
    model's name and version in the repository. ``headers`` may hand over source datasets already read (keyed by
    path); the others are read header-only. The file is Explicit VR Little Endian, written to a temporary name,
    fsynced and renamed into place. Raises ``Rejected`` for sources or a label it cannot use, ``ValueError`` for
    a spec whose segments it cannot code.
    """
    t0 = time.perf_counter()
    if not volume.sources:
        raise Rejected("SEG: the volume lists no source frame")
    _check_label(volume, label)
    descriptions, numbers = _segment_descriptions(segments, algorithm_name, algorithm_version)

    datasets = _read_headers(volume.sources, headers)
    planes = [frame_plane(datasets[s.path], s.frame_number, f"source {s.sop_instance_uid}") for s in volume.sources]
    shapes = {(p.rows, p.columns) for p in planes}
    if len(shapes) != 1:
        raise Rejected(f"SEG: source frames differ in size {sorted(shapes)}")
    rows, columns = shapes.pop()

    # label values -> segment numbers (identity for the usual 0/1 spec)
    label_u8 = sitk.Cast(label, sitk.sitkUInt8) if label.GetPixelID() != sitk.sitkUInt8 else label
    if any(lab != num for lab, num in numbers.items()):
        lut = np.zeros(256, dtype=np.uint8)
        for lab, num in numbers.items():
            lut[lab] = num
        remapped = sitk.GetImageFromArray(lut[sitk.GetArrayViewFromImage(label_u8)])
        remapped.CopyInformation(label_u8)
        label_u8 = remapped
    label_array = sitk.GetArrayViewFromImage(label_u8)
    if int(label_array.max(initial=0)) > len(descriptions):
        raise Rejected(f"SEG: the label holds values above the {len(descriptions)} described segment(s)")
    segment_voxels = int(np.count_nonzero(label_array))

    # mask of every source frame, in volume.sources order
    masks = np.zeros((len(planes), rows, columns), dtype=np.uint8)
    if _direct_slices(volume, planes):
        masks[:] = label_array
    else:
        sampler = _LabelSampler(label_u8)
        for k, p in enumerate(planes):
            masks[k] = sampler.plane(p)
    t_masks = time.perf_counter()

    multi = [s for s in volume.sources if s.frame_number is not None]
    if multi and (len(multi) != len(volume.sources) or len({s.path for s in volume.sources}) != 1):
        raise Rejected("SEG: sources mix single-frame and multi-frame instances, or span several multi-frame ones")

    if multi:
        ds = datasets[volume.sources[0].path]
        n_frames = int(ds.get("NumberOfFrames", 1))
        source_images: list[Dataset] = [_with_type2(ds)]
        pixel_array = np.zeros((n_frames, rows, columns), dtype=np.uint8)
        for k, s in enumerate(volume.sources):
            assert s.frame_number is not None
            if not 1 <= s.frame_number <= n_frames:
                raise Rejected(f"SEG: source frame {s.frame_number} outside 1..{n_frames} of {s.sop_instance_uid}")
            pixel_array[s.frame_number - 1] = masks[k]
    else:
        source_images = [datasets[s.path] for s in volume.sources]
        source_images[0] = _with_type2(source_images[0])
        pixel_array = masks

    plane_positions: list[hd.PlanePositionSequence] | None = None
    omit_empty = not seg.include_empty_frames
    if not pixel_array.any() and omit_empty:
        # "No finding": one empty frame on the first source plane (highdicom needs at least one frame).
        first = planes[0]
        pixel_array = np.zeros((1, rows, columns), dtype=np.uint8)
        plane_positions = [hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, first.position.tolist())]
        omit_empty = False

    series_uid = seg_series_uid(volume.series_instance_uid, algorithm_name, algorithm_version)
    sop_uid = seg_instance_uid(series_uid, volume.sources)
    when = now or _dt.datetime.now().astimezone()
    try:
        segmentation = hd.seg.Segmentation(
            source_images=source_images,
            pixel_array=pixel_array,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=series_uid,
            series_number=seg.series_number,
            sop_instance_uid=sop_uid,
            instance_number=1,
            manufacturer=seg.manufacturer,
            manufacturer_model_name=seg.manufacturer_model_name,
            software_versions=__version__,
            device_serial_number=seg.device_serial_number,
            content_description=f"{algorithm_name} {algorithm_version}"[:64],
            content_label="GGO",
            series_description=seg.series_description,
            institution_name=seg.institution_name,
            content_date=when.date(),
            content_time=when.time().replace(tzinfo=None),
            series_date=when.date(),
            series_time=when.time().replace(tzinfo=None),
            plane_positions=plane_positions,
            omit_empty_frames=omit_empty,
            transfer_syntax_uid=ExplicitVRLittleEndian,
        )
    except (ValueError, AttributeError, TypeError) as exc:
        raise Rejected(f"SEG: highdicom refused the sources or mask: {exc}") from exc
    _repair_copied_patient_module(segmentation)
    t_build = time.perf_counter()

    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    segmentation.save_as(tmp, enforce_file_format=True)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    tmp.replace(out_path)
    _fsync_dir(out_path.parent)
    t_end = time.perf_counter()
    log.info(
        "SEG written",
        extra={
            "sop_instance_uid": sop_uid,
            "series_instance_uid": series_uid,
            "study_instance_uid": volume.study_instance_uid,
            "source_series_instance_uid": volume.series_instance_uid,
            "frames": int(segmentation.NumberOfFrames),
            "segment_voxels": segment_voxels,
            "path": str(out_path),
            "masks_s": round(t_masks - t0, 3),
            "encode_s": round(t_build - t_masks, 3),
            "write_s": round(t_end - t_build, 3),
        },
    )
    return SegArtifact(
        path=out_path,
        sop_instance_uid=sop_uid,
        series_instance_uid=series_uid,
        study_instance_uid=volume.study_instance_uid,
        segment_voxels=segment_voxels,
    )
