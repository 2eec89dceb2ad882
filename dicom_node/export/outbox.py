"""The persistent outbox: every (object, destination) pair is a row in the state database, sent and retried on its
own. The objects are a job's SEG, SR and overlay images (anything :class:`Exportable`).

Row life: ``pending`` -> ``sending`` -> ``delivered`` | ``warning`` (accepted with a warning status; counts as
delivered) | ``failed`` (with the reason), or back to ``pending`` with the node's backoff policy
(``export.backoff``: initial delay doubling up to the maximum) until ``export.max_attempts`` attempts. The tables
and their SQL are the database layer's (:class:`dicom_node.db.ExportStore`); this module decides.
The attempt is counted when the row is claimed, before the send, so a crash mid-send still counts.

One association per batch: a sender claims a destination's due rows together (up to ``export.batch_size``, in
queue order) and sends them over one association (``scu.send_many``), recording each answer as it comes. A row
the association never reached (lost before its turn, or the node stopping) goes back to ``pending`` with its
attempt given back, so a peer that drops the association on one object does not use up the attempts of the
objects behind it.

Not blocking anyone: sends run on the outbox's own threads (never a DIMSE handler's or a job worker's), at most
one association in flight per destination, and there are at least as many threads as configured destinations
(``max(export.workers, len(destinations))``), so a destination that is down, even one that swallows
connections until the timeout, never delays another destination or new receptions.

Delivery is at least once. Restart: rows found in ``sending`` at start go back to ``pending`` (the interrupted
attempt stays counted): a send that a kill interrupted after the peer stored the object, but before its answer
was recorded, is sent again, and the peer gets the same SOP Instance UID twice (a replacement, as PS3.4 B.4.1
allows). A re-run of a job (``dicom-node retry``) re-sends its objects to every destination. The files stay
where the writers put them; the outbox never deletes them.

Jobs: ``on_job_settled(job_id, outcome)`` is called when every destination of a job has accepted every
object of it (``outcome.state == "delivered"``) or as soon as one has failed for good (``"failed"``; the other rows keep
being tried). It is called at least once per outcome: the notification is recorded after the callback returns,
and unrecorded ones are re-announced at start, so the callback must be idempotent. ``retry(job_id)`` puts the
job's failed rows back to ``pending`` with a fresh attempt count and re-arms the notification.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from dicom_node import db as dbmod
from dicom_node.db import ACCEPTED_EXPORT_STATES, ExportItem, ExportRow, ExportState, ExportStore, ExportTarget
from dicom_node.export.scu import destination_key, send_many
from dicom_node.ops.metrics import NodeMetrics
from dicom_node.settings import Destination, ExportSection, Settings
from dicom_node.types import SendResult, SendStatus

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 1.0
"""Longest a worker sleeps without looking at the database (rows re-queued by `dicom-node retry` from another
process are picked up within this)."""

Sender = Callable[[Sequence[Path], Destination, str, float], Generator[SendResult, None, None]]
"""``scu.send_many``'s shape: one result per file tried, in order, stopping early when the rest were not tried."""


class Exportable(Protocol):
    """What the outbox needs of an object a job wrote (``SegArtifact``, ``DicomArtifact``)."""

    @property
    def kind(self) -> str: ...

    @property
    def path(self) -> Path: ...

    @property
    def sop_instance_uid(self) -> str: ...

    @property
    def series_instance_uid(self) -> str: ...

    @property
    def study_instance_uid(self) -> str: ...


@dataclass(frozen=True, slots=True)
class JobExportOutcome:
    """What the outbox tells the job layer: ``delivered`` (every destination accepted, possibly with warnings)
    or ``failed`` (at least one destination failed for good; ``reason`` names them)."""

    job_id: int
    state: Literal["delivered", "failed"]
    reason: str | None
    rows: tuple[ExportRow, ...]

    @property
    def warnings(self) -> tuple[ExportRow, ...]:
        return tuple(r for r in self.rows if r.state == "warning")


JobCallback = Callable[[int, JobExportOutcome], None]


def database_path(settings: Settings) -> Path:
    return settings.storage.dir / dbmod.DB_NAME


class Outbox:
    """The export queue and its sender threads. ``start()`` before sends happen; ``stop()`` to drain."""

    def __init__(
        self,
        db_path: Path,
        export: ExportSection,
        *,
        calling_ae_title: str,
        destinations: Sequence[Destination] = (),
        on_job_settled: JobCallback | None = None,
        sender: Sender = send_many,
        clock: Callable[[], float] = time.time,
        metrics: NodeMetrics | None = None,
    ) -> None:
        self.db_path = db_path
        self.export = export
        self.calling_ae_title = calling_ae_title
        self.destinations = tuple(destinations)
        self._configured = {destination_key(d): d for d in self.destinations}
        """A row's destination as configured now (its TLS settings are not stored in the row); a row whose
        destination is not here is failed, not sent (``_refuse_unconfigured``)."""
        self.metrics = metrics or NodeMetrics()
        self.metrics.known_destinations(self._configured)
        self.on_job_settled = on_job_settled
        self._send = sender
        self._clock = clock
        self._store = ExportStore.open(db_path)
        self._lock = threading.RLock()  # serialises use of self._store across caller threads
        self._wake = threading.Condition()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Recover rows interrupted by a crash, re-announce unrecorded job outcomes, start the sender threads."""
        with self._lock:
            n, jobs = self._store.recover(self._clock())
        if n:
            log.info("outbox: %d interrupted send(s) back to pending", n, extra={"event": "export_recover", "rows": n})
        for job_id in jobs:
            self._maybe_settle(job_id)
        self._stopping.clear()
        count = max(self.export.workers, len(self.destinations), 1)
        for i in range(count):
            t = threading.Thread(target=self._run, name=f"export-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float | None = None) -> None:
        """Stop claiming rows and wait for in-flight sends (each bounded by export.timeout_s)."""
        self._stopping.set()
        with self._wake:
            self._wake.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        self._threads = [t for t in self._threads if t.is_alive()]
        if not self._threads:
            with self._lock:
                self._store.close()

    def __enter__(self) -> Outbox:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(timeout=self.export.timeout_s * 2)

    # ------------------------------------------------------------------------------------------------ API

    def enqueue(self, job_id: int, *artifacts: Exportable) -> list[ExportRow]:
        """One row per (artifact, configured destination), due now, sent in the order
        given (the SEG before the objects that reference it), queued in one transaction. A row that exists for
        the same (job, SOP instance, destination) is re-armed: the job ran again, so its results go to every
        destination again. The job is settled when all its rows are; with no destination at all, at once."""
        dests = self.destinations
        targets = [
            ExportTarget(destination_key(d), d.ae_title, d.host, d.port, d.calling_ae_title or self.calling_ae_title)
            for d in dests
        ]
        items = [
            ExportItem(a.kind, a.sop_instance_uid, a.series_instance_uid, a.study_instance_uid, a.path)
            for a in artifacts
        ]
        with self._lock:
            self._store.enqueue(job_id, items, targets, self._clock())
        rows = self.rows(job_id)
        for r in rows:
            log.info("export queued", extra=self._extra(r, event="export_queued", outcome=r.state))
        self._notify()
        if not dests:
            self._maybe_settle(job_id)
        return rows

    def retry(self, job_id: int) -> int:
        """Failed rows of the job back to pending, attempts reset; returns how many."""
        with self._lock:
            n = self._store.retry_failed(job_id, self._clock())
        _log_retry(job_id, n)
        self._notify()
        return n

    def rows(self, job_id: int | None = None) -> list[ExportRow]:
        with self._lock:
            return self._store.rows(job_id)

    def wait_settled(self, job_id: int, timeout: float) -> JobExportOutcome | None:
        """Block until the job's exports are settled (for tests and tools); None on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            outcome = self.outcome(job_id)
            if outcome is not None:
                return outcome
            time.sleep(0.05)
        return None

    def outcome(self, job_id: int) -> JobExportOutcome | None:
        """The job's settled outcome, or None while it is not settled."""
        return _outcome(job_id, self.rows(job_id))

    # ---------------------------------------------------------------------------------------------- workers

    def _notify(self) -> None:
        with self._wake:
            self._wake.notify_all()

    def _run(self) -> None:
        store = ExportStore.open(self.db_path)
        try:
            while not self._stopping.is_set():
                try:
                    now = self._clock()
                    rows, due = store.claim(now, self.export.batch_size)
                    wait = POLL_INTERVAL_S if due is None else min(POLL_INTERVAL_S, max(0.01, due - now))
                except sqlite3.Error:
                    log.exception("outbox: cannot claim a row", extra={"event": "export_error"})
                    rows, wait = [], POLL_INTERVAL_S
                if not rows:
                    with self._wake:
                        if not self._stopping.is_set():
                            self._wake.wait(wait)
                    continue
                self._attempt(store, rows)
        finally:
            store.close()

    def _attempt(self, store: ExportStore, rows: Sequence[ExportRow]) -> None:
        """Send the claimed ``rows`` (one destination, in queue order) over one association and record each
        answer as it comes; rows not tried (the association was lost before their turn, or the node is
        stopping) go back to pending with their attempt given back."""
        first = rows[0]
        settled: dict[int, None] = {}
        dest = self._configured.get(first.destination)
        if dest is None:
            self._refuse_unconfigured(store, rows)
            return
        done = 0
        retry_at = self._clock()
        t0 = time.monotonic()
        try:
            with contextlib.closing(
                self._send([Path(r.path) for r in rows], dest, first.calling_ae_title, self.export.timeout_s)
            ) as results:
                for row in rows:
                    try:
                        result = next(results, None)
                    except Exception as exc:  # a bug in the sender must not kill the thread or lose the row
                        log.exception("outbox: sender raised", extra={"event": "export_error", "row": row.id})
                        result = SendResult(row.destination, SendStatus.RETRY, None,
                                            f"sender raised {type(exc).__name__}: {exc}")  # fmt: skip
                    if result is None:  # the association was lost before this row's turn
                        break
                    elapsed = time.monotonic() - t0
                    state, next_at = self._record(store, row, result, elapsed)
                    done += 1
                    t0 = time.monotonic()
                    if state == "pending":
                        retry_at = next_at
                    else:
                        settled[row.job_id] = None
                    if self._stopping.is_set():
                        break
        finally:
            untried = [r.id for r in rows[done:]]
            if untried:
                store.release(untried, max(retry_at, self._clock()), self._clock())
            self._notify()  # the destination is free again for other threads
        for job_id in settled:
            self._settle_with(store, job_id)

    def _refuse_unconfigured(self, store: ExportStore, rows: Sequence[ExportRow]) -> None:
        """Rows queued for a destination that is no longer in ``export.destinations`` (removed, or its AE title,
        host or port changed since): failed by name, not sent. The row does not hold the destination's TLS
        settings, and a PACS taken out of the configuration is one the hospital no longer wants written to; so
        sending to the stored address could put patient data on the wire unencrypted, or at a host that is now
        another's. The objects stay in storage: ``dicom-node retry JOB`` once the destination is configured
        again."""
        reason = (
            f"destination {rows[0].destination} is no longer configured (export.destinations): not sent; "
            "`dicom-node retry` once it is configured again"
        )
        try:
            for row in rows:
                self._record(store, row, SendResult(row.destination, SendStatus.FAILED, None, reason), 0.0)
        finally:
            self._notify()
        for job_id in dict.fromkeys(r.job_id for r in rows):
            self._settle_with(store, job_id)

    def _record(
        self, store: ExportStore, row: ExportRow, result: SendResult, elapsed: float
    ) -> tuple[ExportState, float]:
        """One row's answer: its new state and when it is next due, written, counted and logged."""
        self.metrics.export_attempt(row.destination, result.status in (SendStatus.SUCCESS, SendStatus.WARNING), elapsed)
        now = self._clock()
        state: ExportState
        if result.status == SendStatus.SUCCESS:
            state, next_at = "delivered", now
        elif result.status == SendStatus.WARNING:
            state, next_at = "warning", now
        elif result.status == SendStatus.FAILED or row.attempts >= self.export.max_attempts:
            state, next_at = "failed", now
        else:
            state, next_at = "pending", now + self.export.backoff.delay(row.attempts)
        reason = result.reason
        if state == "failed" and result.status == SendStatus.RETRY:
            reason = f"gave up after {row.attempts} attempt(s): {result.reason}"
        store.record_attempt(row.id, state, next_at, result.dimse_status, reason, now)
        log_fn = log.warning if state in ("failed", "warning") or result.status == SendStatus.RETRY else log.info
        log_fn(
            "export attempt %d to %s: %s (%s)",
            row.attempts, row.destination, state, reason,
            extra=self._extra(
                row, event="export_attempt", outcome=state, result=result.status.value,
                dimse_status=None if result.dimse_status is None else f"0x{result.dimse_status:04X}",
                reason=reason, elapsed_s=round(elapsed, 3),
                retry_in_s=round(next_at - now, 1) if state == "pending" else None,
            ),
        )  # fmt: skip
        return state, next_at

    @staticmethod
    def _extra(row: ExportRow, **fields: Any) -> dict[str, Any]:
        return {
            "job_id": row.job_id,
            "kind": row.kind,
            "sop_instance_uid": row.sop_instance_uid,
            "series_instance_uid": row.series_instance_uid,
            "study_instance_uid": row.study_instance_uid,
            "destination": row.destination,
            "attempt": row.attempts,
            **fields,
        }

    def _maybe_settle(self, job_id: int) -> None:
        with self._lock:
            self._settle_with(self._store, job_id)

    def _settle_with(self, store: ExportStore, job_id: int) -> None:
        """Announce the job's outcome once it is decided and not yet announced."""
        outcome = _outcome(job_id, store.rows(job_id))
        if outcome is None or not store.claim_announcement(job_id, outcome.state):
            return
        log.info(
            "job %d exports %s",
            job_id, outcome.state,
            extra={"event": "export_settled", "job_id": job_id, "outcome": outcome.state, "reason": outcome.reason},
        )  # fmt: skip
        ok = True
        if self.on_job_settled is not None:
            try:
                self.on_job_settled(job_id, outcome)
            except Exception:
                ok = False
                log.exception("outbox: job callback failed", extra={"event": "export_error", "job_id": job_id})
        store.finish_announcement(job_id, outcome.state if ok else None, self._clock())


def _outcome(job_id: int, rows: Sequence[ExportRow]) -> JobExportOutcome | None:
    failed = [r for r in rows if r.state == "failed"]
    if failed:
        reason = "; ".join(f"{r.destination}: {r.reason}" for r in failed)
        return JobExportOutcome(job_id, "failed", reason, tuple(rows))
    if all(r.state in ACCEPTED_EXPORT_STATES for r in rows):
        warn = [r for r in rows if r.state == "warning"]
        warned = "; ".join(f"{r.destination}: {r.reason}" for r in warn) or None
        return JobExportOutcome(job_id, "delivered", warned, tuple(rows))
    return None


def _log_retry(job_id: int, rows: int) -> None:
    if rows:
        log.info(
            "job %d: %d failed export(s) re-queued", job_id, rows,
            extra={"event": "export_retry", "job_id": job_id, "rows": rows},
        )  # fmt: skip


# ------------------------------------------------------------------------------- for `dicom-node status/retry`


def list_exports(settings: Settings, job_id: int | None = None) -> list[dict[str, Any]]:
    """Every outbox row (or one job's) as plain dicts, for `dicom-node status`."""
    path = database_path(settings)
    if not path.exists():
        return []
    store = ExportStore.open(path)
    try:
        return [asdict(r) for r in store.rows(job_id)]
    finally:
        store.close()


def retry_failed_for_job(settings: Settings, job_id: int) -> int:
    """`dicom-node retry JOB`: the job's failed exports back to pending (a running node picks them up within
    about a second); returns how many rows."""
    store = ExportStore.open(database_path(settings))
    try:
        n = store.retry_failed(job_id, time.time())
    finally:
        store.close()
    _log_retry(job_id, n)
    return n
