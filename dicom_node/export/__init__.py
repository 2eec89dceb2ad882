"""Stage 5: the job's results as DICOM objects, and their delivery to every destination.

``seg_writer`` (the DICOM SEG, with highdicom), ``outbox`` (the persistent, retrying queue; its SQL is the
database layer's), ``scu`` (one C-STORE and the meaning of its status).
"""

from dicom_node.export.outbox import JobExportOutcome, Outbox, list_exports, retry_failed_for_job
from dicom_node.export.scu import classify_status, destination_key, send
from dicom_node.export.seg_writer import SEGMENT_CODES, derived_uid, write_seg

__all__ = [
    "SEGMENT_CODES",
    "JobExportOutcome",
    "Outbox",
    "classify_status",
    "derived_uid",
    "destination_key",
    "list_exports",
    "retry_failed_for_job",
    "send",
    "write_seg",
]
