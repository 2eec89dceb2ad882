"""The overlay series: for viewers that do not display SEG, the CT in a lung window with the ground-glass outline
and a banner burned in, one image per source slice with a finding (``overlay.all_slices``: every source slice).

**SOP class and photometric interpretation: Secondary Capture Image Storage (1.2.840.10008.5.1.4.1.1.7), RGB,
8 bits, single frame, Explicit VR Little Endian.** Single-frame Secondary Capture is the image object every PACS
viewer displays (it is how scanners and workstations have always stored screenshots); RGB because the outline
must stand apart from the greyscale CT, which a MONOCHROME2 object (CT Image Storage allows no other) cannot do;
single frame because multi-frame Secondary Capture is displayed by fewer viewers. The SC IOD's optional Frame of
Reference and Image Plane modules carry the source slice's geometry (position, orientation, pixel spacing, slice
thickness; same Frame of Reference UID), so viewers that link series by position scroll the overlay with the CT.

Each image: the same study, its own series (``overlay.series_number`` / ``series_description``), Burned In
Annotation YES, Conversion Type WSD (workstation), Image Type DERIVED\\SECONDARY, the source image in its Source
Image Sequence, the equipment identification of ``seg.*``. UIDs are derived as the SEG's are: the series from
(source series, model name, model version), each instance from (that series, the source SOP instance and
frame), so a re-run replaces the images instead of adding new ones.
"""

from __future__ import annotations

import datetime as _dt
import logging
import time
from pathlib import Path

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage
from pydicom.valuerep import format_number_as_ds

from dicom_node import __version__
from dicom_node.export.render import NOT_FOR_DIAGNOSTIC_USE, Window, banner, burden_lines, slice_with_outline
from dicom_node.export.seg_writer import derived_uid
from dicom_node.export.sources import SourcePlanes, copyable_header
from dicom_node.settings import OverlaySection, SegSection
from dicom_node.types import DicomArtifact, FramePlane, SourceInstance
from inference.atomic import atomic_path
from inference.burden import Burden

log = logging.getLogger(__name__)

SOURCE_IMAGE_FOR_PROCESSING = Code("121322", "DCM", "Source image for image processing operation")
"""Purpose of reference of the source slice (CID 7202)."""

_AXIS_LETTERS = (("R", "L"), ("A", "P"), ("F", "H"))
"""Patient Orientation letters of the LPS axes, (negative, positive) direction."""


def overlay_series_uid(source_series_uid: str, model_name: str, model_version: str) -> str:
    return derived_uid("dicom-node overlay series", source_series_uid, model_name, model_version)


def overlay_instance_uid(series_uid: str, source: SourceInstance) -> str:
    return derived_uid(
        "dicom-node overlay instance", series_uid, source.sop_instance_uid, str(source.frame_number or 0)
    )


def patient_orientation(plane: FramePlane) -> tuple[str, str]:
    """Patient Orientation (0020,0020) of a plane: the main patient direction of its rows and of its columns."""
    out = []
    for vector in (plane.orientation[:3], plane.orientation[3:]):
        axis = int(np.argmax(np.abs(vector)))
        out.append(_AXIS_LETTERS[axis][1 if vector[axis] > 0 else 0])
    return out[0], out[1]


def _ds(value: float) -> str:
    return str(format_number_as_ds(float(value)))


def _place(image: hd.sc.SCImage, source: SourceInstance, frame_of_reference_uid: str) -> None:
    """Frame of Reference and Image Plane modules: where the source slice lies."""
    plane, header = source.plane, source.header
    image.FrameOfReferenceUID = frame_of_reference_uid
    image.PositionReferenceIndicator = header.get("PositionReferenceIndicator", "")
    image.ImagePositionPatient = [_ds(v) for v in plane.position]
    image.ImageOrientationPatient = [_ds(v) for v in plane.orientation]
    thickness = header.get("SliceThickness")
    image.SliceThickness = "" if thickness in (None, "") else _ds(float(thickness))


def _reference(source: SourceInstance) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.sop_class_uid
    item.ReferencedSOPInstanceUID = source.sop_instance_uid
    if source.frame_number is not None:
        item.ReferencedFrameNumber = source.frame_number
    item.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept.from_code(SOURCE_IMAGE_FOR_PROCESSING)]
    return item


def overlay_lines(burden: Burden | None, algorithm_name: str, algorithm_version: str) -> list[str]:
    return [
        f"{NOT_FOR_DIAGNOSTIC_USE}   AI ground-glass outline",
        *burden_lines(burden),
        f"{algorithm_name} {algorithm_version}",
    ]


def write_overlay(
    planes: SourcePlanes,
    masks: npt.NDArray[np.uint8],
    burden: Burden | None,
    *,
    algorithm_name: str,
    algorithm_version: str,
    overlay: OverlaySection,
    equipment: SegSection,
    out_dir: Path,
    now: _dt.datetime | None = None,
) -> list[DicomArtifact]:
    """Write the overlay images of ``masks`` (the ground glass on each source plane, ``planes``' order) into
    ``out_dir`` (one file per image, named by its SOP Instance UID), atomically and durably (the outbox sends
    them). Returns them in source order; none when no slice has a finding and ``overlay.all_slices`` is off."""
    t0 = time.perf_counter()
    volume = planes.volume
    series_uid = overlay_series_uid(volume.series_instance_uid, algorithm_name, algorithm_version)
    window = Window(overlay.window_center, overlay.window_width)
    lines = overlay_lines(burden, algorithm_name, algorithm_version)
    size = max(10, planes.columns // 40)
    when = now or _dt.datetime.now().astimezone()
    date, clock = when.date(), when.time().replace(tzinfo=None)
    written: list[DicomArtifact] = []
    for k, source in enumerate(volume.sources):
        if not (overlay.all_slices or masks[k].any()):
            continue
        rendered = banner(slice_with_outline(planes.hu(k), masks[k], window), lines, size=size)
        header = copyable_header(source.header)
        sop_uid = overlay_instance_uid(series_uid, source)
        image = hd.sc.SCImage(
            pixel_array=np.asarray(rendered, dtype=np.uint8),
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            study_instance_uid=volume.study_instance_uid,
            series_instance_uid=series_uid,
            series_number=overlay.series_number,
            sop_instance_uid=sop_uid,
            instance_number=k + 1,
            manufacturer=equipment.manufacturer,
            patient_id=header.PatientID,
            patient_name=header.PatientName,
            patient_birth_date=header.PatientBirthDate,
            patient_sex=header.PatientSex or None,
            accession_number=header.AccessionNumber,
            study_id=header.StudyID,
            study_date=header.StudyDate,
            study_time=header.StudyTime,
            referring_physician_name=header.ReferringPhysicianName,
            pixel_spacing=source.plane.pixel_spacing,
            patient_orientation=patient_orientation(source.plane),
            transfer_syntax_uid=ExplicitVRLittleEndian,
            series_description=overlay.series_description,
            manufacturer_model_name=equipment.manufacturer_model_name,
            software_versions=__version__,
            device_serial_number=equipment.device_serial_number,
            institution_name=equipment.institution_name,
            content_date=date,
            content_time=clock,
            series_date=date,
            series_time=clock,
            specific_character_set=header.get("SpecificCharacterSet"),
        )
        _place(image, source, volume.frame_of_reference_uid)
        image.ConversionType = "WSD"
        # The source's body part (the lungs the node segments lie in the chest): with it, no Laterality is due.
        image.BodyPartExamined = source.header.get("BodyPartExamined") or "CHEST"
        image.BurnedInAnnotation = "YES"
        image.LossyImageCompression = "00"
        image.SourceImageSequence = [_reference(source)]
        image.DerivationDescription = (
            f"CT in a lung window (W {overlay.window_width:g} / L {overlay.window_center:g}) with the outline of "
            f"the ground-glass segmentation of {algorithm_name} {algorithm_version} burned in"
        )[:1024]
        path = out_dir / f"{sop_uid}.dcm"
        with atomic_path(path) as tmp:
            image.save_as(tmp, enforce_file_format=True)
        written.append(
            DicomArtifact(
                kind="overlay",
                path=path,
                sop_class_uid=SecondaryCaptureImageStorage,
                sop_instance_uid=sop_uid,
                series_instance_uid=series_uid,
                study_instance_uid=volume.study_instance_uid,
            )
        )
    log.info(
        "overlay written",
        extra={
            "series_instance_uid": series_uid,
            "study_instance_uid": volume.study_instance_uid,
            "source_series_instance_uid": volume.series_instance_uid,
            "images": len(written),
            "seconds": round(time.perf_counter() - t0, 3),
        },
    )
    return written


__all__ = ["overlay_instance_uid", "overlay_series_uid", "patient_orientation", "write_overlay"]
