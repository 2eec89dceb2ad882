"""``dicom-node serve``: the long-lived node, and :class:`Node`, which wires its parts together.

:class:`Node` can run in-process (tests): exclusive lock on the storage folder, database open, start-up recovery
(:mod:`dicom_node.recovery`), the job processor, the worker pool, the completion monitor, the C-STORE/C-ECHO SCP
(plain and DICOM TLS listeners), and with ``http.enabled`` the HTTP endpoints (:mod:`dicom_node.ops`: health,
readiness, Prometheus metrics, the status page). One :class:`~dicom_node.ops.metrics.NodeMetrics` per node is
handed to every part that counts. It holds no logic of its own. :func:`serve` adds logging and signals:
SIGTERM / SIGINT stop accepting associations, let the stores in flight finish (each answered only once durable),
stop the workers (a job still running keeps its lease and goes back to the queue on the next start), close the
database and return 0. A second signal exits at once (nothing acknowledged is lost: every Success was answered
after its bytes and row were durable).

The job processor is injected (``Node(settings, processor=...)``: any :class:`~dicom_node.worker.JobProcessor`);
by default it is the production :class:`~dicom_node.processing.SeriesProcessor`.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import signal
import sqlite3
import threading
from typing import Any

from dicom_node.admin import collect_status
from dicom_node.db import DB_NAME, Database, is_disk_full
from dicom_node.errors import NodeError
from dicom_node.logs import setup_logging
from dicom_node.ops.http_server import OpsServer, build_ops_server
from dicom_node.ops.metrics import NodeMetrics
from dicom_node.processing import SeriesProcessor
from dicom_node.receive.completion import CompletionMonitor
from dicom_node.receive.scp import StorageSCP
from dicom_node.receive.spool import Spool
from dicom_node.recovery import recover
from dicom_node.reserve import DiskReserve
from dicom_node.settings import Settings
from dicom_node.tls import check_configuration
from dicom_node.worker import JobProcessor, WorkerPool

log = logging.getLogger(__name__)


class StorageLocked(NodeError):
    """Another node serves from the storage folder."""


FULL_DISK_BYTES = 1024 * 1024
"""Below this much free space a start-up failure of the state database is taken for a full disk."""


class StorageFull(NodeError):
    """The storage folder's disk is full at start: nothing can be recorded, so the node does not start."""


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
        self.completion: CompletionMonitor | None = None
        self.reserve: DiskReserve | None = None
        self.processor = processor
        self.metrics = NodeMetrics()
        """This node's Prometheus registry, handed to every part that counts."""
        self.ops: OpsServer | None = None
        self.port = 0
        self.tls_port = 0
        self.http_port = 0

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
        st = self.settings.storage
        check_configuration(self.settings)
        try:
            self._lock_storage()
            self.reserve = DiskReserve(self.storage, st.reserve_bytes)
            self.reserve.start()
            self.spool = Spool(self.storage, fsync=st.fsync, min_free_bytes=st.min_free_bytes, reserve=self.reserve)
            self.db = Database(self.storage / DB_NAME)
            recover(self.settings, self.db, self.spool)
        except (sqlite3.Error, OSError) as exc:
            free = shutil.disk_usage(self.storage).free
            # SQLite reports a full disk as "disk is full", or as a plain I/O error when it cannot even create
            # its WAL index: judge by the free space too.
            if not (is_disk_full(exc) or free < max(st.reserve_bytes, FULL_DISK_BYTES)):
                raise
            self._release_storage()
            raise StorageFull(
                f"storage {self.storage}: the disk is full ({free} bytes free), so start-up recovery cannot record "
                f"its state; free some space there and start again ({exc})"
            ) from exc
        if self.processor is None:
            self.processor = SeriesProcessor(self.settings, self.db, metrics=self.metrics)
        self.processor.start()
        self.workers = WorkerPool(self.settings, self.db, self.processor, metrics=self.metrics)
        self.workers.start()
        self.completion = CompletionMonitor(self.settings, self.db, on_queued=self.workers.wake)
        self.completion.start()
        self.scp = StorageSCP(
            self.settings, self.spool, self.db, on_released=self.completion.kick, on_stored=self.processor.on_stored,
            metrics=self.metrics,
        )  # fmt: skip
        self.port = self.scp.start()
        self.tls_port = self.scp.tls_port
        if self.settings.http.enabled:
            self.ops = build_ops_server(
                self.settings, db=self.db, spool=self.spool, scp=self.scp,
                backend_problem=self.processor.backend_problem, metrics=self.metrics,
                status=lambda: collect_status(self.settings),
                backend_endpoints=self.processor.backend_endpoints,
            )  # fmt: skip
            try:
                self.http_port = self.ops.start()
            except NodeError:  # e.g. the port is taken: stop what runs already (a managed Triton among it)
                self.ops = None
                self.stop()
                raise
        log.info("node started", extra={"ae_title": self.settings.node.ae_title, "port": self.port,
                                         "storage": str(self.storage)})  # fmt: skip
        return self.port

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop accepting, finish stores in flight, stop loops and workers, persist and release the storage."""
        log.info("node stopping")
        if self.scp is not None:
            self.scp.stop_accepting()
            if not self.scp.wait_idle(grace_s):
                log.warning("associations still open after the grace period; aborting them")
            self.scp.abort_all()
        if self.ops is not None:  # it said "not ready" while associations drained; its data closes next
            self.ops.stop()
        if self.completion is not None:
            self.completion.stop()
        if self.workers is not None and not self.workers.stop(timeout=grace_s):
            log.warning("a job is still running; it goes back to the queue on the next start")
        if self.processor is not None:
            self.processor.stop()
        self._release_storage()
        log.info("node stopped")

    def _release_storage(self) -> None:
        if self.reserve is not None:
            self.reserve.stop()
        if self.db is not None:
            self.db.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def serve(settings: Settings) -> int:
    """Run the node in the foreground until SIGTERM / SIGINT. Returns the exit code."""
    setup_logging(settings.logging)
    node = Node(settings)
    stop = threading.Event()
    signals = {"count": 0}

    def on_signal(signum: int, _frame: Any) -> None:
        signals["count"] += 1
        if signals["count"] > 1:
            log.error("second signal: exiting at once")
            os._exit(1)
        log.info(f"signal {signal.Signals(signum).name}: shutting down")
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
