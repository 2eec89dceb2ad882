"""``dicom-node serve``: the long-lived node.

:class:`Node` puts the pieces together and can run in-process (tests): exclusive lock on the storage folder,
database open + recovery, C-STORE/C-ECHO SCP, the completion loop, the worker pool. :func:`serve` adds logging
and signals: SIGTERM / SIGINT stop accepting associations, let the stores in flight finish (each answered only
once durable), stop the workers (a job still running keeps its lease and goes back to the queue on the next
start), close the database and return 0. A second signal exits at once (nothing acknowledged is lost: every
Success was answered after its bytes and row were durable).

Recovery at start:

* temp files a crash left in the spool are deleted (they were never acknowledged);
* spool files without a database row (crash between the file's rename and the row's commit) are indexed;
* INFERRING jobs (their worker died with the previous process) go back to QUEUED, or FAILED after
  ``workers.max_attempts`` interrupted attempts; a COMPLETE job is queued;
* open series (job RECEIVED) simply resume: completion measures quiet time from the stored last arrival.

The job processor is injected: ``Node(settings, processor=...)``, or :func:`build_processor`, which uses
``dicom_node.processing.build_processor(settings)`` when that module exists and :class:`DefaultProcessor`
otherwise. A processor may also have ``start()`` / ``stop()``, which the node calls around its own life, and
``on_stored(record)``, which the SCP calls for each instance stored (it must only queue work: the production
processor's pre-decoder).
"""

from __future__ import annotations

import fcntl
import importlib
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pydicom

from dicom_node.completion import CompletionStats, decide
from dicom_node.db import DB_NAME, Database, HeaderFacts, SeriesStats
from dicom_node.errors import NodeError, Rejected
from dicom_node.logs import setup_logging
from dicom_node.scp import StorageSCP
from dicom_node.settings import Settings
from dicom_node.spool import Spool, clean_uid, is_acceptable_uid
from dicom_node.types import InstanceRecord, Job, JobState, SeriesManifest
from dicom_node.worker import JobOutcome, JobProcessor, TransitionLog, WorkerPool

LOG = logging.getLogger("dicom_node.daemon")
CLOG = logging.getLogger("dicom_node.completion")


class DefaultProcessor:
    """Selection (modality) and, when ``dicom_node.reconstruct`` exists, reconstruction; no inference.

    Good for tests and for a node without a model. ``dicom_node.processing`` replaces it in production.
    """

    def __init__(self, settings: Settings, db: Database | None = None) -> None:
        self.settings = settings
        self.db = db
        self.volumes: dict[int, Any] = {}
        """Job id -> the reconstructed CTVolume (tests look at it)."""

    def process(self, job: Job, manifest: SeriesManifest) -> JobOutcome:
        try:
            selection: Any = importlib.import_module("dicom_node.selection")
        except ModuleNotFoundError:
            selection = None
        if selection is not None and hasattr(selection, "select_series"):
            verdict = selection.select_series(manifest, self.settings.selection)
            if not verdict.selected:
                return JobOutcome.skipped(str(verdict.reason))
        elif self.db is not None:
            modalities = {
                r["modality"]
                for r in self.db.query(
                    "SELECT DISTINCT modality FROM instances WHERE series_instance_uid=?", (job.series_instance_uid,)
                )
            }
            wanted = set(self.settings.selection.modalities)
            if not modalities & wanted:
                return JobOutcome.skipped(
                    f"modality {', '.join(sorted(str(m) for m in modalities))} not in selection.modalities "
                    f"{sorted(wanted)}"
                )
        try:
            reconstruct = importlib.import_module("dicom_node.reconstruct").reconstruct
        except ModuleNotFoundError:
            return JobOutcome.done(f"{len(manifest.instances)} instances (no reconstruction module)")
        try:
            volume = reconstruct(manifest, self.settings.reconstruction)
        except Rejected as exc:
            return JobOutcome.failed(str(exc), retryable=False)
        self.volumes[job.id] = volume
        size = volume.image.GetSize()
        return JobOutcome.done(f"reconstructed {size[0]}x{size[1]}x{size[2]} volume (no inference in this processor)")


def build_processor(settings: Settings, db: Database | None = None) -> JobProcessor:
    """``dicom_node.processing.build_processor(settings, db)`` when that module exists, else the default."""
    try:
        processing = importlib.import_module("dicom_node.processing")
    except ModuleNotFoundError as exc:
        if exc.name != "dicom_node.processing":
            raise
        return DefaultProcessor(settings, db)
    factory = processing.build_processor
    if db is None:
        return DefaultProcessor(settings, db)
    proc: JobProcessor = factory(settings, db)
    return proc


class StorageLocked(NodeError):
    pass


class Node:
    """The whole receiving node, constructible in-process. ``start()`` returns the bound port."""

    def __init__(self, settings: Settings, processor: JobProcessor | None = None) -> None:
        self.settings = settings
        self.storage = settings.storage.dir
        self.storage.mkdir(parents=True, exist_ok=True)
        self._lock_fd: int | None = None
        self.db: Database | None = None
        self.spool: Spool | None = None
        self.scp: StorageSCP | None = None
        self.workers: WorkerPool | None = None
        self.processor = processor
        self._stop = threading.Event()
        self._kick = threading.Event()
        self._completion: threading.Thread | None = None
        self.port = 0

    # -- life ----------------------------------------------------------------------------------------------
    def _lock_storage(self) -> None:
        path = self.storage / "node.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise StorageLocked(f"storage {self.storage}: another dicom-node is serving from it") from exc
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def start(self) -> int:
        self._lock_storage()
        st = self.settings.storage
        self.spool = Spool(self.storage, fsync=st.fsync, min_free_bytes=st.min_free_bytes)
        self.db = Database(self.storage / DB_NAME)
        self.recover()
        if self.processor is None:
            self.processor = build_processor(self.settings, self.db)
        starter = getattr(self.processor, "start", None)
        if callable(starter):
            starter()
        self.workers = WorkerPool(self.settings, self.db, self.processor)
        self.workers.start()
        self._completion = threading.Thread(target=self._completion_loop, name="completion", daemon=True)
        self._completion.start()
        on_stored = getattr(self.processor, "on_stored", None)
        self.scp = StorageSCP(
            self.settings, self.spool, self.db, on_released=self._kick.set,
            on_stored=on_stored if callable(on_stored) else None,
        )  # fmt: skip
        self.port = self.scp.start()
        LOG.info("node started", extra={"ae_title": self.settings.node.ae_title, "port": self.port,
                                         "storage": str(self.storage)})  # fmt: skip
        return self.port

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop accepting, finish stores in flight, stop loops and workers, persist and release the storage."""
        LOG.info("node stopping")
        if self.scp is not None:
            self.scp.stop_accepting()
            if not self.scp.wait_idle(grace_s):
                LOG.warning("associations still open after the grace period; aborting them")
            self.scp.abort_all()
        self._stop.set()
        self._kick.set()
        if self._completion is not None:
            self._completion.join(10)
        if self.workers is not None and not self.workers.stop(timeout=grace_s):
            LOG.warning("a job is still running; it goes back to the queue on the next start")
        stopper = getattr(self.processor, "stop", None)
        if callable(stopper):
            stopper()
        if self.db is not None:
            self.db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        LOG.info("node stopped")

    # -- recovery ------------------------------------------------------------------------------------------
    def recover(self) -> None:
        assert self.db is not None and self.spool is not None
        removed = self.spool.remove_temp_files()
        known = self.db.known_paths()
        indexed = 0
        for path in self.spool.iter_files():
            if str(path) in known:
                continue
            if self._index_orphan(path):
                indexed += 1
        moved = self.db.requeue_expired(all_inferring=True, max_attempts=self.settings.workers.max_attempts)
        open_series = len(self.db.open_series())
        LOG.info(
            "recovered state",
            extra={"temp_files_removed": removed, "files_indexed": indexed, "jobs_requeued": moved,
                   "open_series": open_series},
        )  # fmt: skip

    def _index_orphan(self, path: Path) -> bool:
        """A durable spool file whose row never committed: index it from its own header."""
        assert self.db is not None and self.spool is not None
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            meta = ds.file_meta
            sop_class = clean_uid(ds.get("SOPClassUID")) or clean_uid(meta.get("MediaStorageSOPClassUID"))
            sop = clean_uid(ds.get("SOPInstanceUID")) or clean_uid(meta.get("MediaStorageSOPInstanceUID"))
            study = clean_uid(ds.get("StudyInstanceUID"))
            series = clean_uid(ds.get("SeriesInstanceUID"))
            if not all(is_acceptable_uid(u) for u in (sop_class, sop, study, series)):
                raise ValueError("missing or invalid UIDs")
            pos = ds.get("ImagePositionPatient")
            ori = ds.get("ImageOrientationPatient")
            facts = HeaderFacts(
                modality=ds.get("Modality"),
                instance_number=int(ds.InstanceNumber) if ds.get("InstanceNumber") not in (None, "") else None,
                number_of_frames=int(ds.NumberOfFrames) if ds.get("NumberOfFrames") not in (None, "") else None,
                position=tuple(float(v) for v in pos) if pos is not None and len(pos) == 3 else None,  # type: ignore[arg-type]
                orientation=tuple(float(v) for v in ori) if ori is not None and len(ori) == 6 else None,  # type: ignore[arg-type]
            )
            rec = InstanceRecord(
                sop_instance_uid=sop, sop_class_uid=sop_class, study_instance_uid=study, series_instance_uid=series,
                transfer_syntax_uid=str(meta.TransferSyntaxUID), path=path, size=path.stat().st_size,
                calling_ae_title=str(meta.get("SourceApplicationEntityTitle", "")).strip(),
                association_id="recovered", received_at=path.stat().st_mtime,
            )  # fmt: skip
            self.db.add_instance(rec, facts, self.settings.series.on_new_instances_after_done)
            LOG.info("indexed spool file without a row", extra={"path": str(path), "sop_uid": sop})
            return True
        except Exception as exc:
            reason = f"spool file unreadable at recovery: {type(exc).__name__}: {exc}"
            LOG.warning(reason, extra={"path": str(path)})
            try:
                self.spool.quarantine(reason, path.read_bytes())
                path.unlink()
            except OSError:
                pass
            self.db.record_event("recovery", reason, path=path)
            return False

    # -- completion ----------------------------------------------------------------------------------------
    def _completion_loop(self) -> None:
        poll = self.settings.series.poll_interval_s
        last_lease_check = 0.0
        while not self._stop.is_set():
            try:
                self.check_completion()
                now = time.monotonic()
                if now - last_lease_check > 5:
                    last_lease_check = now
                    assert self.db is not None
                    moved = self.db.requeue_expired(max_attempts=self.settings.workers.max_attempts)
                    if moved:
                        LOG.warning("leases expired; jobs re-queued", extra={"jobs": moved})
                        self._wake_workers()
            except Exception:
                LOG.exception("completion loop error")
            self._kick.wait(poll)
            self._kick.clear()

    def _wake_workers(self) -> None:
        if self.workers is not None:
            self.workers.wake()

    def check_completion(self, now: float | None = None) -> int:
        """Declare complete what is due; returns how many series completed."""
        assert self.db is not None
        now = time.time() if now is None else now
        done = 0
        for s in self.db.open_series():
            stats = self._stats(s)
            decision = decide(stats, now, self.settings.series, self.settings.reconstruction.spacing_tolerance)
            if not decision.complete:
                continue
            if self.db.complete_series(s, decision.reason):
                done += 1
                job = self.db.job(s.job_id)
                if job is not None:
                    TransitionLog.log(job, JobState.COMPLETE, decision.reason)
                    TransitionLog.log(job, JobState.QUEUED, None)
        if done:
            self._wake_workers()
        return done

    def _stats(self, s: SeriesStats) -> CompletionStats:
        assert self.db is not None
        released = s.released_at is not None
        orientations: list[list[float]] = []
        positions: list[list[float]] = []
        multi = 0
        if released and self.settings.series.complete_on_release:
            orientations, positions, multi = self.db.series_geometry(s.series_instance_uid)
        return CompletionStats(
            instance_count=s.instance_count,
            last_arrival=s.last_arrival,
            released=released,
            orientations=orientations,
            positions=positions,
            multiframe_instances=multi,
        )


def serve(settings: Settings) -> int:
    """Run the node in the foreground until SIGTERM / SIGINT. Returns the exit code."""
    setup_logging(settings.logging)
    node = Node(settings)
    stop = threading.Event()
    signals = {"count": 0}

    def on_signal(signum: int, _frame: Any) -> None:
        signals["count"] += 1
        if signals["count"] > 1:
            LOG.error("second signal: exiting at once")
            os._exit(1)
        LOG.info(f"signal {signal.Signals(signum).name}: shutting down")
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    node.start()
    try:
        while not stop.wait(1.0):
            pass
    finally:
        node.stop()
    return 0
