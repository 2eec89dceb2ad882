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

The sources' headers (read with ``stop_before_pixels`` when the series was planned) travel with the volume's
source records: highdicom needs no pixel data of the sources.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import highdicom as hd
import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node import __version__
from dicom_node.errors import Rejected
from dicom_node.export.sources import SourcePlanes, copyable_header, repair_copied_patient_module
from dicom_node.settings import SegSection
from dicom_node.types import CTVolume, SegArtifact, SourceInstance
from inference.atomic import atomic_path

log = logging.getLogger(__name__)

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


# ---------------------------------------------------------------------------------------------------- writer


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


def check_referencable(frames: Sequence[tuple[Path, int | None]]) -> None:
    """What the SEG writer can reference, decided from the source frames alone (path, frame number), so a job
    can refuse a series before decoding it: single-frame instances, or the frames of one multi-frame instance."""
    multi = [f for f in frames if f[1] is not None]
    if multi and (len(multi) != len(frames) or len({path for path, _ in frames}) != 1):
        raise Rejected("SEG: sources mix single-frame and multi-frame instances, or span several multi-frame ones")


def write_seg(
    volume: CTVolume,
    label: sitk.Image,
    *,
    segments: Sequence[SegmentLike],
    algorithm_name: str,
    algorithm_version: str,
    seg: SegSection,
    out_path: Path,
    now: _dt.datetime | None = None,
) -> SegArtifact:
    """Write the SEG of ``label`` (uint8 on ``volume.image``'s grid) for ``volume``'s sources to ``out_path``.

    ``segments``: the model spec's segments (label value + name); ``algorithm_name``/``algorithm_version``: the
    model's name and version in the repository. Each source brings its header and plane (read once, when the
    series was planned). The file is Explicit VR Little Endian, written atomically and durably. Raises
    ``Rejected`` for sources or a label it cannot use, ``ValueError`` for a spec whose segments it cannot code.
    """
    t0 = time.perf_counter()
    if not volume.sources:
        raise Rejected("SEG: the volume lists no source frame")
    _check_label(volume, label)
    descriptions, numbers = _segment_descriptions(segments, algorithm_name, algorithm_version)

    try:
        on_sources = SourcePlanes(volume)
    except Rejected as exc:
        raise Rejected(f"SEG: {exc}") from exc
    planes = [s.plane for s in volume.sources]
    rows, columns = on_sources.rows, on_sources.columns

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

    masks = on_sources.labels(label_u8)  # every source frame, in volume.sources order
    t_masks = time.perf_counter()

    check_referencable([(s.path, s.frame_number) for s in volume.sources])
    multi = [s for s in volume.sources if s.frame_number is not None]

    if multi:
        ds = volume.sources[0].header
        n_frames = int(ds.get("NumberOfFrames", 1))
        source_images: list[Dataset] = [copyable_header(ds)]
        pixel_array = np.zeros((n_frames, rows, columns), dtype=np.uint8)
        for k, s in enumerate(volume.sources):
            assert s.frame_number is not None
            if not 1 <= s.frame_number <= n_frames:
                raise Rejected(f"SEG: source frame {s.frame_number} outside 1..{n_frames} of {s.sop_instance_uid}")
            pixel_array[s.frame_number - 1] = masks[k]
    else:
        source_images = [s.header for s in volume.sources]
        source_images[0] = copyable_header(source_images[0])
        pixel_array = masks

    plane_positions: list[hd.PlanePositionSequence] | None = None
    omit_empty = not seg.include_empty_frames
    if not pixel_array.any() and omit_empty:
        # "No finding": one empty frame on the first source plane (highdicom needs at least one frame).
        first = planes[0]
        pixel_array = np.zeros((1, rows, columns), dtype=np.uint8)
        plane_positions = [hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, list(first.position))]
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
    repair_copied_patient_module(segmentation)
    t_build = time.perf_counter()

    with atomic_path(out_path) as tmp:
        segmentation.save_as(tmp, enforce_file_format=True)
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
        segment_numbers=tuple(sorted(numbers.items())),
    )
