"""Stage 5: the job's results as DICOM objects (and a preview), and their delivery to every destination.

``seg_writer`` (the DICOM SEG, with highdicom), ``sr_writer`` (the TID 1500 burden report), ``overlay`` (Secondary
Capture images with the outline burned in), ``preview`` (the PNG of key slices), ``render`` (the drawing they
share), ``sources`` (what they take from the source series: patient/study, label and CT on each source plane),
``results`` (which of them a job writes), ``outbox`` (the persistent, retrying queue; its SQL is the database
layer's), ``scu`` (one C-STORE and the meaning of its status).
"""

from dicom_node.export.outbox import Exportable, JobExportOutcome, Outbox, list_exports, retry_failed_for_job
from dicom_node.export.overlay import write_overlay
from dicom_node.export.preview import write_preview
from dicom_node.export.results import DerivedResults, write_derived
from dicom_node.export.scu import classify_status, destination_key, send
from dicom_node.export.seg_writer import SEGMENT_CODES, derived_uid, write_seg
from dicom_node.export.sources import SourcePlanes
from dicom_node.export.sr_writer import write_sr

__all__ = [
    "SEGMENT_CODES",
    "DerivedResults",
    "Exportable",
    "JobExportOutcome",
    "Outbox",
    "SourcePlanes",
    "classify_status",
    "derived_uid",
    "destination_key",
    "list_exports",
    "retry_failed_for_job",
    "send",
    "write_derived",
    "write_overlay",
    "write_preview",
    "write_seg",
    "write_sr",
]
