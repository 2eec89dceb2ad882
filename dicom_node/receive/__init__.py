"""Stages 1-2 of the pipeline: receive instances over DIMSE, keep them durably, decide when a series is complete.

``scp`` (the pynetdicom AE: filter -> spool -> database -> status), ``spool`` (the durable files), ``completion``
(the pure decision and the loop that applies it). Knows nothing of models.
"""

from dicom_node.receive.completion import CompletionMonitor, CompletionStats, Decision, Verdict, decide
from dicom_node.receive.scp import StorageSCP
from dicom_node.receive.spool import DiskFull, Spool, uid_key

__all__ = [
    "CompletionMonitor",
    "CompletionStats",
    "Decision",
    "DiskFull",
    "Spool",
    "StorageSCP",
    "Verdict",
    "decide",
    "uid_key",
]
