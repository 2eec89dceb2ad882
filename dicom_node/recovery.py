"""Start-up recovery: make the spool and the database agree again after a crash at any line.

* temp files a crash left in the spool are deleted (they were never acknowledged);
* spool files without a database row (a crash between the file's rename and the row's commit) are indexed from
  their own header; an unreadable one is quarantined with the reason;
* INFERRING jobs (their worker died with the previous process) go back to QUEUED, or FAILED after
  ``workers.max_attempts`` interrupted attempts; a COMPLETE job is queued;
* open series (job RECEIVED) simply resume: completion measures quiet time from the stored last arrival.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pydicom

from dicom_node.db import Database
from dicom_node.receive.spool import Spool
from dicom_node.series.headers import header_facts, instance_uids
from dicom_node.settings import Settings
from dicom_node.types import InstanceRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RecoveryReport:
    temp_files_removed: int
    files_indexed: int
    jobs_requeued: list[int]
    open_series: int


def recover(settings: Settings, db: Database, spool: Spool) -> RecoveryReport:
    """Run every recovery step once, before the node accepts anything."""
    removed = spool.remove_temp_files()
    known = db.known_paths()
    indexed = sum(index_orphan(settings, db, spool, path) for path in spool.iter_files() if str(path) not in known)
    moved = db.requeue_expired(all_inferring=True, max_attempts=settings.workers.max_attempts)
    report = RecoveryReport(removed, indexed, moved, len(db.open_series()))
    log.info(
        "recovered state",
        extra={"temp_files_removed": removed, "files_indexed": indexed, "jobs_requeued": moved,
               "open_series": report.open_series},
    )  # fmt: skip
    return report


def index_orphan(settings: Settings, db: Database, spool: Spool, path: Path) -> bool:
    """A durable spool file whose row never committed: index it from its own header (True), or quarantine it."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        uids = instance_uids(ds)
        problem = uids.problem()
        if problem is not None:
            raise ValueError(problem)
        meta = ds.file_meta
        stat = path.stat()
        rec = InstanceRecord(
            sop_instance_uid=uids.sop_instance_uid, sop_class_uid=uids.sop_class_uid,
            study_instance_uid=uids.study_instance_uid, series_instance_uid=uids.series_instance_uid,
            transfer_syntax_uid=uids.transfer_syntax_uid, path=path, size=stat.st_size,
            calling_ae_title=str(meta.get("SourceApplicationEntityTitle", "")).strip(),
            association_id="recovered", received_at=stat.st_mtime,
        )  # fmt: skip
        db.add_instance(rec, header_facts(ds), settings.series.on_new_instances_after_done)
        log.info("indexed spool file without a row", extra={"path": str(path), "sop_uid": uids.sop_instance_uid})
        return True
    except Exception as exc:
        reason = f"spool file unreadable at recovery: {type(exc).__name__}: {exc}"
        log.warning(reason, extra={"path": str(path)})
        try:
            spool.quarantine(reason, path.read_bytes())
            path.unlink()
        except OSError:
            pass
        db.record_event("recovery", reason, path=path)
        return False
