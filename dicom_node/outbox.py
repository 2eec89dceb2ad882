"""The persistent outbox: every (SEG, destination) pair is a row in the state database, sent and retried on its own.

Row life: ``pending`` -> ``sending`` -> ``delivered`` | ``warning`` (accepted with a warning status; counts as
delivered) | ``failed`` (with the reason), or back to ``pending`` with exponential backoff
(``export.backoff_initial_s`` doubling up to ``export.backoff_max_s``) until ``export.max_attempts`` attempts.
The attempt is counted when the row is claimed, before the send, so a crash mid-send still counts.

Not blocking anyone: sends run on the outbox's own threads (never a DIMSE handler's or a job worker's), at most
one send in flight per destination, and there are at least as many threads as configured destinations
(``max(export.workers, len(destinations))``), so a destination that is down, even one that swallows
connections until the timeout, never delays another destination or new receptions.

Restart: rows found in ``sending`` at start go back to ``pending`` (the interrupted attempt stays counted; a
resend of the same SOP Instance UID replaces at the destination). The SEG file stays where the writer put it;
the outbox never deletes it.

Jobs: ``on_job_settled(job_id, outcome)`` is called when every destination of a job has accepted the SEG
(``outcome.state == "delivered"``) or as soon as one has failed for good (``"failed"``; the other rows keep
being tried). It is called at least once per outcome: the notification is recorded after the callback returns,
and unrecorded ones are re-announced at start, so the callback must be idempotent. ``retry(job_id)`` puts the
job's failed rows back to ``pending`` with a fresh attempt count and re-arms the notification.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from dicom_node import db as dbmod
from dicom_node.scu import destination_key, send
from dicom_node.settings import Destination, ExportSection, Settings
from dicom_node.types import SegArtifact, SendResult, SendStatus

log = logging.getLogger("dicom_node.export")

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id              INTEGER NOT NULL,
    sop_instance_uid    TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    study_instance_uid  TEXT NOT NULL,
    path                TEXT NOT NULL,
    destination         TEXT NOT NULL,
    dest_ae_title       TEXT NOT NULL,
    dest_host           TEXT NOT NULL,
    dest_port           INTEGER NOT NULL,
    calling_ae_title    TEXT NOT NULL,
    state               TEXT NOT NULL,
    attempts            INTEGER NOT NULL DEFAULT 0,
    next_attempt_at     REAL NOT NULL,
    dimse_status        INTEGER,
    reason              TEXT,
    created_at          REAL NOT NULL,
    updated_at          REAL NOT NULL,
    delivered_at        REAL,
    UNIQUE (job_id, sop_instance_uid, destination)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS outbox_job ON outbox (job_id);
CREATE TABLE IF NOT EXISTS outbox_jobs (
    job_id       INTEGER PRIMARY KEY,
    notified     TEXT,
    notified_at  REAL
);
"""

RowState = Literal["pending", "sending", "delivered", "warning", "failed"]
ACCEPTED = ("delivered", "warning")
POLL_INTERVAL_S = 1.0
"""Longest a worker sleeps without looking at the database (rows re-queued by `dicom-node retry` from another
process are picked up within this)."""

Sender = Callable[[Path, Destination, str, float], SendResult]


@dataclass(frozen=True, slots=True)
class ExportRow:
    id: int
    job_id: int
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    path: str
    destination: str
    dest_ae_title: str
    dest_host: str
    dest_port: int
    calling_ae_title: str
    state: RowState
    attempts: int
    next_attempt_at: float
    dimse_status: int | None
    reason: str | None
    created_at: float
    updated_at: float
    delivered_at: float | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> ExportRow:
        return cls(**{k: row[k] for k in cls.__dataclass_fields__})


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


def _connect(path: Path) -> sqlite3.Connection:
    conn = dbmod.connect(path)
    conn.executescript(SCHEMA)
    return conn


@contextmanager
def _tx(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    with dbmod.transaction(conn):
        yield conn


def backoff_s(export: ExportSection, attempts: int) -> float:
    """Delay before attempt ``attempts + 1`` after ``attempts`` failed ones: initial * 2^(attempts-1), capped."""
    return float(min(export.backoff_max_s, export.backoff_initial_s * (2 ** max(0, attempts - 1))))


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
        sender: Sender = send,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db_path = db_path
        self.export = export
        self.calling_ae_title = calling_ae_title
        self.destinations = tuple(destinations)
        self.on_job_settled = on_job_settled
        self._send = sender
        self._clock = clock
        self._conn = _connect(db_path)
        self._lock = threading.RLock()  # serialises use of self._conn across caller threads
        self._wake = threading.Condition()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._local = threading.local()

    # ------------------------------------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Recover rows interrupted by a crash, re-announce unrecorded job outcomes, start the sender threads."""
        now = self._clock()
        with self._lock, _tx(self._conn) as c:
            n = c.execute(
                "UPDATE outbox SET state='pending', next_attempt_at=?, updated_at=? WHERE state='sending'", (now, now)
            ).rowcount
            c.execute("UPDATE outbox_jobs SET notified=NULL WHERE notified LIKE 'announcing:%'")
            jobs = [int(r[0]) for r in c.execute("SELECT DISTINCT job_id FROM outbox")]
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
                self._conn.close()

    def __enter__(self) -> Outbox:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(timeout=self.export.timeout_s * 2)

    # ------------------------------------------------------------------------------------------------ API

    def enqueue(
        self, job_id: int, artifact: SegArtifact, destinations: Sequence[Destination] | None = None
    ) -> list[ExportRow]:
        """One row per destination (default: the configured ones) for ``artifact``; idempotent per
        (job, SOP instance, destination): an existing row keeps its state, except a failed one, which is
        re-armed. With no destination at all the job is settled (delivered) at once."""
        dests = self.destinations if destinations is None else tuple(destinations)
        now = self._clock()
        with self._lock, _tx(self._conn) as c:
            c.execute("INSERT OR IGNORE INTO outbox_jobs (job_id) VALUES (?)", (job_id,))
            c.execute("UPDATE outbox_jobs SET notified=NULL, notified_at=NULL WHERE job_id=?", (job_id,))
            for d in dests:
                c.execute(
                    """INSERT INTO outbox (job_id, sop_instance_uid, series_instance_uid, study_instance_uid, path,
                           destination, dest_ae_title, dest_host, dest_port, calling_ae_title, state, attempts,
                           next_attempt_at, created_at, updated_at)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', 0, ?, ?, ?)
                       ON CONFLICT (job_id, sop_instance_uid, destination) DO UPDATE SET
                           path=excluded.path,
                           state=CASE WHEN state='failed' THEN 'pending' ELSE state END,
                           attempts=CASE WHEN state='failed' THEN 0 ELSE attempts END,
                           next_attempt_at=CASE WHEN state='failed' THEN excluded.next_attempt_at
                                                ELSE next_attempt_at END,
                           updated_at=excluded.updated_at""",
                    (
                        job_id, artifact.sop_instance_uid, artifact.series_instance_uid, artifact.study_instance_uid,
                        str(artifact.path), destination_key(d), d.ae_title, d.host, d.port,
                        d.calling_ae_title or self.calling_ae_title, now, now, now,
                    ),
                )  # fmt: skip
        rows = self.rows(job_id)
        for r in rows:
            log.info(
                "export queued",
                extra=self._extra(r, event="export_queued", outcome=r.state),
            )
        self._notify()
        if not dests:
            self._maybe_settle(job_id)
        return rows

    def retry(self, job_id: int) -> int:
        """Failed rows of the job back to pending, attempts reset; returns how many."""
        n = retry_failed_rows(self._conn, job_id, self._clock(), lock=self._lock)
        self._notify()
        return n

    def rows(self, job_id: int | None = None) -> list[ExportRow]:
        with self._lock:
            return _rows(self._conn, job_id)

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
        rows = self.rows(job_id)
        return _outcome(job_id, rows)

    # ---------------------------------------------------------------------------------------------- workers

    def _notify(self) -> None:
        with self._wake:
            self._wake.notify_all()

    def _thread_conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(self.db_path)
            self._local.conn = conn
        return conn

    def _claim(self, conn: sqlite3.Connection) -> tuple[ExportRow | None, float]:
        """Claim the most overdue pending row whose destination has nothing in flight; or say how long to wait."""
        now = self._clock()
        with _tx(conn) as c:
            row = c.execute(
                """SELECT * FROM outbox
                   WHERE state='pending' AND next_attempt_at <= ?
                     AND destination NOT IN (SELECT destination FROM outbox WHERE state='sending')
                   ORDER BY next_attempt_at, id LIMIT 1""",
                (now,),
            ).fetchone()
            if row is None:
                nxt = c.execute("SELECT MIN(next_attempt_at) FROM outbox WHERE state='pending'").fetchone()[0]
                wait = POLL_INTERVAL_S if nxt is None else min(POLL_INTERVAL_S, max(0.01, float(nxt) - now))
                return None, wait
            c.execute(
                "UPDATE outbox SET state='sending', attempts=attempts+1, updated_at=? WHERE id=?", (now, row["id"])
            )
            claimed = c.execute("SELECT * FROM outbox WHERE id=?", (row["id"],)).fetchone()
        return ExportRow.from_row(claimed), 0.0

    def _run(self) -> None:
        conn = self._thread_conn()
        try:
            while not self._stopping.is_set():
                try:
                    row, wait = self._claim(conn)
                except sqlite3.Error:
                    log.exception("outbox: cannot claim a row", extra={"event": "export_error"})
                    row, wait = None, POLL_INTERVAL_S
                if row is None:
                    with self._wake:
                        if not self._stopping.is_set():
                            self._wake.wait(wait)
                    continue
                self._attempt(conn, row)
        finally:
            conn.close()

    def _attempt(self, conn: sqlite3.Connection, row: ExportRow) -> None:
        dest = Destination(ae_title=row.dest_ae_title, host=row.dest_host, port=row.dest_port)
        calling = row.calling_ae_title
        t0 = time.monotonic()
        try:
            result = self._send(Path(row.path), dest, calling, self.export.timeout_s)
        except Exception as exc:  # a bug in the sender must not kill the thread or lose the row
            log.exception("outbox: sender raised", extra={"event": "export_error", "row": row.id})
            result = SendResult(row.destination, SendStatus.RETRY, None, f"sender raised {type(exc).__name__}: {exc}")
        elapsed = time.monotonic() - t0
        now = self._clock()
        if result.status == SendStatus.SUCCESS:
            state, next_at = "delivered", now
        elif result.status == SendStatus.WARNING:
            state, next_at = "warning", now
        elif result.status == SendStatus.FAILED or row.attempts >= self.export.max_attempts:
            state, next_at = "failed", now
        else:
            state, next_at = "pending", now + backoff_s(self.export, row.attempts)
        reason = result.reason
        if state == "failed" and result.status == SendStatus.RETRY:
            reason = f"gave up after {row.attempts} attempt(s): {result.reason}"
        with _tx(conn) as c:
            c.execute(
                """UPDATE outbox SET state=?, next_attempt_at=?, dimse_status=?, reason=?, updated_at=?,
                       delivered_at=CASE WHEN ? IN ('delivered', 'warning') THEN ? ELSE delivered_at END
                   WHERE id=?""",
                (state, next_at, result.dimse_status, reason, now, state, now, row.id),
            )
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
        self._notify()  # the destination is free again for other threads
        if state != "pending":
            self._maybe_settle(row.job_id, conn)

    @staticmethod
    def _extra(row: ExportRow, **fields: Any) -> dict[str, Any]:
        return {
            "job_id": row.job_id,
            "sop_instance_uid": row.sop_instance_uid,
            "series_instance_uid": row.series_instance_uid,
            "study_instance_uid": row.study_instance_uid,
            "destination": row.destination,
            "attempt": row.attempts,
            **fields,
        }

    def _maybe_settle(self, job_id: int, conn: sqlite3.Connection | None = None) -> None:
        """Announce the job's outcome once it is decided and not yet announced."""
        if conn is None:
            with self._lock:
                self._settle_with(self._conn, job_id)
        else:
            self._settle_with(conn, job_id)

    def _settle_with(self, conn: sqlite3.Connection, job_id: int) -> None:
        rows = _rows(conn, job_id)
        outcome = _outcome(job_id, rows)
        if outcome is None:
            return
        with _tx(conn) as c:
            # claim the announcement: one thread announces a given outcome, once
            current = _notified(c, job_id)
            if current is not None and (current == outcome.state or current.startswith("announcing:")):
                return
            c.execute(
                "INSERT OR REPLACE INTO outbox_jobs (job_id, notified, notified_at) VALUES (?, ?, NULL)",
                (job_id, f"announcing:{outcome.state}"),
            )
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
        with _tx(conn) as c:
            c.execute(
                "UPDATE outbox_jobs SET notified=?, notified_at=? WHERE job_id=?",
                (outcome.state if ok else None, self._clock(), job_id),
            )


def _notified(c: sqlite3.Connection, job_id: int) -> str | None:
    row = c.execute("SELECT notified FROM outbox_jobs WHERE job_id=?", (job_id,)).fetchone()
    return None if row is None else row[0]


def _rows(conn: sqlite3.Connection, job_id: int | None) -> list[ExportRow]:
    if job_id is None:
        cur = conn.execute("SELECT * FROM outbox ORDER BY id")
    else:
        cur = conn.execute("SELECT * FROM outbox WHERE job_id=? ORDER BY id", (job_id,))
    return [ExportRow.from_row(r) for r in cur.fetchall()]


def _outcome(job_id: int, rows: Sequence[ExportRow]) -> JobExportOutcome | None:
    failed = [r for r in rows if r.state == "failed"]
    if failed:
        reason = "; ".join(f"{r.destination}: {r.reason}" for r in failed)
        return JobExportOutcome(job_id, "failed", reason, tuple(rows))
    if all(r.state in ACCEPTED for r in rows):
        warn = [r for r in rows if r.state == "warning"]
        warned = "; ".join(f"{r.destination}: {r.reason}" for r in warn) or None
        return JobExportOutcome(job_id, "delivered", warned, tuple(rows))
    return None


def retry_failed_rows(conn: sqlite3.Connection, job_id: int, now: float, *, lock: Any = None) -> int:
    def run() -> int:
        with _tx(conn) as c:
            n = c.execute(
                """UPDATE outbox SET state='pending', attempts=0, next_attempt_at=?, updated_at=?,
                       reason='retry requested; previously: ' || COALESCE(reason, '')
                   WHERE job_id=? AND state='failed'""",
                (now, now, job_id),
            ).rowcount
            if n:
                c.execute("UPDATE outbox_jobs SET notified=NULL, notified_at=NULL WHERE job_id=?", (job_id,))
        if n:
            log.info(
                "job %d: %d failed export(s) re-queued", job_id, n,
                extra={"event": "export_retry", "job_id": job_id, "rows": n},
            )  # fmt: skip
        return int(n)

    if lock is None:
        return run()
    with lock:
        return run()


# ------------------------------------------------------------------------------- for `dicom-node status/retry`


def list_exports(settings: Settings, job_id: int | None = None) -> list[dict[str, Any]]:
    """Every outbox row (or one job's) as plain dicts, for `dicom-node status`."""
    path = database_path(settings)
    if not path.exists():
        return []
    conn = _connect(path)
    try:
        return [asdict(r) for r in _rows(conn, job_id)]
    finally:
        conn.close()


def retry_failed_for_job(settings: Settings, job_id: int) -> int:
    """`dicom-node retry JOB`: the job's failed exports back to pending (a running node picks them up within
    about a second); returns how many rows."""
    conn = _connect(database_path(settings))
    try:
        return retry_failed_rows(conn, job_id, time.time())
    finally:
        conn.close()
