"""The lesion-burden report: a TID 1500 Measurement Report (Enhanced SR) that references the SEG's segment.

Enhanced SR Storage (1.2.840.10008.5.1.4.1.1.88.22), written by highdicom's ``sr`` module, Explicit VR Little
Endian. Enhanced rather than Comprehensive 3D SR: the report holds no 3-D coordinates, and Enhanced SR is the
older, more widely implemented SOP class (dcmqi writes its TID 1500 reports as Enhanced SR too).

Content (the structure of dcmqi's reports, ``../shared/data/ct_lidc_0001_jpegls/nodule_seg_sr/``):

- observer: the node as a device (name, manufacturer, model, serial number from ``seg.*``); procedure reported
  LOINC 24627-2 "CT Chest";
- three TID 1411 volumetric ROI groups, right lung, left lung and both, each referencing the SEG's ground-glass
  segment (with the source series), finding "Ground glass opacity" (SCT 1217294009, category SCT 49755003), finding
  site Lung (SCT 39607008) with its laterality (Right 24028007, Left 7771000, Bilateral 51440002), algorithm
  identification as in the SEG (model name and version), and the measurements Volume (SCT 118565006, UCUM ``ml``)
  and percent of the lung volume (UCUM ``%``); the two per-lung groups add the grade (0-5) as a qualitative
  evaluation;
- three TID 1501 groups holding the lung volumes (finding Lung, same finding sites): what the percentages are of.

DICOM has no code for "percent of the lung involved" or for a per-lung CT severity grade; those three concepts are
coded in the project's own scheme :data:`CODING_SCHEME` (declared in the Coding Scheme Identification Sequence, as
dcmqi does with 99LIDCQIICR). The SEG and every source image are listed as evidence (Current Requested Procedure
Evidence Sequence). UIDs are derived as the SEG's: the series from (source series, model name, model version), the
instance from (that series, the SEG's SOP instance UID), so a re-run replaces the report.
"""

from __future__ import annotations

import datetime as _dt
import logging
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import EnhancedSRStorage, ExplicitVRLittleEndian

from dicom_node import __version__
from dicom_node.errors import Rejected
from dicom_node.export.seg_writer import (
    ARTIFICIAL_INTELLIGENCE,
    GROUND_GLASS_OPACITY,
    LUNG,
    MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
    SEGMENTATION_STORAGE,
    derived_uid,
)
from dicom_node.export.sources import copyable_header, repair_copied_patient_module
from dicom_node.settings import SegSection, SrSection
from dicom_node.types import CTVolume, DicomArtifact, SegArtifact
from inference.atomic import atomic_path
from inference.burden import Burden, LungBurden

log = logging.getLogger(__name__)

CODING_SCHEME = "99DCMNODE"
"""The project's private coding scheme (PS3.16 8.2: designators starting with 99 are private)."""
PERCENT_OF_LUNG = Code("GGO-PCT", CODING_SCHEME, "Ground glass volume as percent of lung volume")
SEVERITY_GRADE = Code("CTSS-LUNG", CODING_SCHEME, "CT severity grade of the lung (0-5)")
GRADE_CODES = {
    0: Code("CTSS-0", CODING_SCHEME, "0: no ground glass"),
    1: Code("CTSS-1", CODING_SCHEME, "1: less than 5 %"),
    2: Code("CTSS-2", CODING_SCHEME, "2: 5-25 %"),
    3: Code("CTSS-3", CODING_SCHEME, "3: 26-50 %"),
    4: Code("CTSS-4", CODING_SCHEME, "4: 51-75 %"),
    5: Code("CTSS-5", CODING_SCHEME, "5: more than 75 %"),
}
"""The per-lung grade bands (``inference.burden.grade``)."""

VOLUME = Code("118565006", "SCT", "Volume")
MILLILITER = Code("ml", "UCUM", "milliliter")
PERCENT = Code("%", "UCUM", "percent")
RIGHT = Code("24028007", "SCT", "Right")
LEFT = Code("7771000", "SCT", "Left")
BILATERAL = Code("51440002", "SCT", "Bilateral")
CT_CHEST = Code("24627-2", "LN", "CT Chest")
DEVICE = Code("121007", "DCM", "Device")

SIDES: tuple[tuple[str, Code], ...] = (("right", RIGHT), ("left", LEFT), ("both", BILATERAL))
"""The report's groups, in order: the key into the burden and the laterality."""


def sr_series_uid(source_series_uid: str, model_name: str, model_version: str) -> str:
    return derived_uid("dicom-node sr series", source_series_uid, model_name, model_version)


def sr_instance_uid(series_uid: str, seg_sop_instance_uid: str) -> str:
    return derived_uid("dicom-node sr instance", series_uid, seg_sop_instance_uid)


def _side(burden: Burden, key: str) -> LungBurden:
    return {"right": burden.right, "left": burden.left, "both": burden.total}[key]


def _seg_evidence(seg: SegArtifact) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = SEGMENTATION_STORAGE
    ds.SOPInstanceUID = seg.sop_instance_uid
    ds.StudyInstanceUID = seg.study_instance_uid
    ds.SeriesInstanceUID = seg.series_instance_uid
    return ds


def _segment_number(seg: SegArtifact, ggo_labels: Sequence[int]) -> int:
    numbers = dict(seg.segment_numbers)
    for label in ggo_labels:
        if label in numbers:
            return numbers[label]
    raise Rejected(f"SR: the SEG {seg.sop_instance_uid} has no ground-glass segment (labels {list(ggo_labels)})")


def measurement_groups(
    volume: CTVolume,
    seg: SegArtifact,
    burden: Burden,
    *,
    segment_number: int,
    algorithm: hd.sr.AlgorithmIdentification,
    tracking_root: str,
) -> list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations | hd.sr.MeasurementsAndQualitativeEvaluations]:
    """The report's measurement groups (see the module docstring)."""
    groups: list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations | hd.sr.MeasurementsAndQualitativeEvaluations]
    groups = []
    lung_groups: list[hd.sr.MeasurementsAndQualitativeEvaluations] = []
    for key, laterality in SIDES:
        numbers = _side(burden, key)
        site = hd.sr.FindingSite(LUNG, laterality=laterality)
        name = "both lungs" if key == "both" else f"{key} lung"
        evaluations = (
            None if key == "both" else [hd.sr.QualitativeEvaluation(SEVERITY_GRADE, GRADE_CODES[numbers.grade])]
        )
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=derived_uid(tracking_root, "ground glass", key), identifier=f"Ground glass opacity, {name}"
                ),
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=SEGMENTATION_STORAGE,
                    sop_instance_uid=seg.sop_instance_uid,
                    segment_number=segment_number,
                    source_series=hd.sr.SourceSeriesForSegmentation(volume.series_instance_uid),
                ),
                finding_type=GROUND_GLASS_OPACITY,
                finding_category=MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
                algorithm_id=algorithm,
                finding_sites=[site],
                measurements=[
                    hd.sr.Measurement(name=VOLUME, value=numbers.ggo_ml, unit=MILLILITER),
                    hd.sr.Measurement(name=PERCENT_OF_LUNG, value=numbers.percent, unit=PERCENT),
                ],
                qualitative_evaluations=evaluations,
            )
        )
        lung_groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=derived_uid(tracking_root, "lung", key), identifier=f"Lung fields, {name}"
                ),
                finding_type=LUNG,
                algorithm_id=algorithm,
                finding_sites=[site],
                measurements=[hd.sr.Measurement(name=VOLUME, value=numbers.lung_ml, unit=MILLILITER)],
            )
        )
    return [*groups, *lung_groups]


def write_sr(
    volume: CTVolume,
    seg: SegArtifact,
    burden: Burden,
    *,
    ggo_labels: Sequence[int],
    algorithm_name: str,
    algorithm_version: str,
    sr: SrSection,
    equipment: SegSection,
    out_path: Path,
    now: _dt.datetime | None = None,
) -> DicomArtifact:
    """Write the burden report of ``volume``'s job, referencing ``seg``'s ground-glass segment (the segment of
    the first of ``ggo_labels`` the SEG holds), to ``out_path``, atomically and durably (the outbox sends it)."""
    if not volume.sources:
        raise Rejected("SR: the volume lists no source frame")
    series_uid = sr_series_uid(volume.series_instance_uid, algorithm_name, algorithm_version)
    sop_uid = sr_instance_uid(series_uid, seg.sop_instance_uid)
    algorithm = hd.sr.AlgorithmIdentification(
        name=algorithm_name, version=algorithm_version, family=ARTIFICIAL_INTELLIGENCE
    )
    observer = hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept.from_code(DEVICE),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid(
                "dicom-node device", equipment.manufacturer, equipment.manufacturer_model_name,
                equipment.device_serial_number,
            ),
            name=equipment.manufacturer_model_name,
            manufacturer_name=equipment.manufacturer,
            model_name=equipment.manufacturer_model_name,
            serial_number=equipment.device_serial_number,
        ),
    )  # fmt: skip
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=CT_CHEST,
        imaging_measurements=measurement_groups(
            volume, seg, burden,
            segment_number=_segment_number(seg, ggo_labels), algorithm=algorithm,
            tracking_root=f"dicom-node sr tracking {sop_uid}",
        ),
    )  # fmt: skip
    headers = list({s.sop_instance_uid: s.header for s in volume.sources}.values())
    evidence = [copyable_header(headers[0]), *headers[1:], _seg_evidence(seg)]
    when = now or _dt.datetime.now().astimezone()
    try:
        document = hd.sr.EnhancedSR(
            evidence=evidence,
            content=report[0],
            series_instance_uid=series_uid,
            series_number=sr.series_number,
            sop_instance_uid=sop_uid,
            instance_number=1,
            manufacturer=equipment.manufacturer,
            is_complete=True,
            institution_name=equipment.institution_name,
            series_description=sr.series_description,
            manufacturer_model_name=equipment.manufacturer_model_name,
            software_versions=__version__,
            device_serial_number=equipment.device_serial_number,
            series_date=when.date(),
            series_time=when.time().replace(tzinfo=None),
            content_date=when.date(),
            content_time=when.time().replace(tzinfo=None),
            coding_schemes=[
                CodingSchemeIdentificationItem(
                    CODING_SCHEME, name="dicom-node codes", responsible_organization="dicom-node project"
                )
            ],
            transfer_syntax_uid=ExplicitVRLittleEndian,
        )
    except (ValueError, AttributeError, TypeError) as exc:
        raise Rejected(f"SR: highdicom refused the report: {exc}") from exc
    repair_copied_patient_module(document)
    with atomic_path(out_path) as tmp:
        document.save_as(tmp, enforce_file_format=True)
    log.info(
        "SR written",
        extra={
            "sop_instance_uid": sop_uid,
            "series_instance_uid": series_uid,
            "study_instance_uid": volume.study_instance_uid,
            "seg_sop_instance_uid": seg.sop_instance_uid,
            "path": str(out_path),
        },
    )
    return DicomArtifact(
        kind="SR",
        path=out_path,
        sop_class_uid=EnhancedSRStorage,
        sop_instance_uid=sop_uid,
        series_instance_uid=series_uid,
        study_instance_uid=volume.study_instance_uid,
    )


__all__ = [
    "CODING_SCHEME",
    "GRADE_CODES",
    "PERCENT_OF_LUNG",
    "SEVERITY_GRADE",
    "measurement_groups",
    "sr_instance_uid",
    "sr_series_uid",
    "write_sr",
]
