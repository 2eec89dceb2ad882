"""The node's durable state: one SQLite file, ``<storage.dir>/state.sqlite3``.

Tables: ``instances`` (one row per stored SOP instance, keyed by its UID, so a duplicate replaces), ``series``
(last arrival, run counter, state), ``jobs`` (one row per run of a series: received -> complete -> queued ->
inferring -> exporting -> done / skipped / failed, with reason, attempts and lease), ``events`` (refusals and
other things an operator must be able to see later: unknown calling AE, unreadable object, bad UID...),
``heartbeat`` (one row the readiness probe rewrites, to prove the database takes writes).

Every state transition is one transaction. The database runs in WAL mode with ``synchronous=FULL`` and a busy
timeout, so a committed transition survives a crash and concurrent processes (``dicom-node status``) wait
instead of failing. The outbox's SQL is here too (:class:`ExportStore`), on connections of its own threads.

Durability order on receipt: the instance file is made durable first (spool), then its row is committed, then
Success is answered. A crash after the file and before the row leaves a spool file the database does not know;
:meth:`Database.known_paths` + the daemon's start-up reconciliation re-index such files, so the two always agree
after a restart (nothing is lost: the sender got no Success and will resend, and the resend replaces the file).
"""

from __future__ import annotations

import errno
import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dicom_node.jobs import TRANSITIONS, FailureStage, Job, JobState, check_transition, sources_of
from dicom_node.types import HeaderFacts, InstanceRecord, SeriesManifest

DB_NAME = "state.sqlite3"
BUSY_TIMEOUT_MS = 30_000

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid    TEXT PRIMARY KEY,
    sop_class_uid       TEXT NOT NULL,
    study_instance_uid  TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    path                TEXT NOT NULL,
    size                INTEGER NOT NULL,
    calling_ae_title    TEXT NOT NULL,
    association_id      TEXT NOT NULL,
    received_at         REAL NOT NULL,
    modality            TEXT,
    instance_number     INTEGER,
    number_of_frames    INTEGER,
    position            TEXT,
    orientation         TEXT,
    run                 INTEGER
);
CREATE INDEX IF NOT EXISTS instances_series ON instances (series_instance_uid);
CREATE TABLE IF NOT EXISTS series (
    series_instance_uid TEXT PRIMARY KEY,
    study_instance_uid  TEXT NOT NULL,
    modality            TEXT,
    state               TEXT NOT NULL,
    run                 INTEGER NOT NULL DEFAULT 0,
    instance_count      INTEGER NOT NULL DEFAULT 0,
    first_arrival       REAL NOT NULL,
    last_arrival        REAL NOT NULL,
    last_association_id TEXT,
    released_at         REAL,
    reason              TEXT
);
CREATE TABLE IF NOT EXISTS jobs (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    study_instance_uid  TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    run                 INTEGER NOT NULL,
    state               TEXT NOT NULL,
    reason              TEXT,
    attempts            INTEGER NOT NULL DEFAULT 0,
    lease_expires_at    REAL,
    not_before          REAL,
    created_at          REAL NOT NULL,
    updated_at          REAL NOT NULL,
    failure_stage       TEXT,
    deferred_since      REAL,
    deferrals           INTEGER NOT NULL DEFAULT 0,
    burden              TEXT,
    windows_total       INTEGER,
    windows_run         INTEGER,
    UNIQUE (series_instance_uid, run)
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
CREATE TABLE IF NOT EXISTS events (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    at                  REAL NOT NULL,
    kind                TEXT NOT NULL,
    calling_ae_title    TEXT,
    association_id      TEXT,
    sop_instance_uid    TEXT,
    series_instance_uid TEXT,
    status              INTEGER,
    reason              TEXT NOT NULL,
    path                TEXT
);
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
    resends             INTEGER NOT NULL DEFAULT 0,
    kind                TEXT NOT NULL DEFAULT 'SEG',
    UNIQUE (job_id, sop_instance_uid, destination)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS outbox_job ON outbox (job_id);
CREATE TABLE IF NOT EXISTS outbox_jobs (
    job_id       INTEGER PRIMARY KEY,
    notified     TEXT,
    notified_at  REAL
);
CREATE TABLE IF NOT EXISTS heartbeat (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    at           REAL NOT NULL
);
"""

MIGRATIONS: tuple[tuple[str, str, str], ...] = (
    ("jobs", "failure_stage", "TEXT"),
    ("outbox", "resends", "INTEGER NOT NULL DEFAULT 0"),
    ("jobs", "deferred_since", "REAL"),
    ("jobs", "deferrals", "INTEGER NOT NULL DEFAULT 0"),
    ("jobs", "burden", "TEXT"),
    ("jobs", "windows_total", "INTEGER"),
    ("jobs", "windows_run", "INTEGER"),
    ("outbox", "kind", "TEXT NOT NULL DEFAULT 'SEG'"),
)
"""Columns added since the first release: (table, column, type), added to an older database at open."""

SERIES_RECEIVING = "receiving"
"""The series has an open run (its job is RECEIVED)."""
SERIES_PROCESSED = "processed"
"""Its last run was declared complete; new instances start a rerun or are only stored (config)."""


def is_disk_full(exc: BaseException) -> bool:
    """True for SQLite's "database or disk is full" and for an OSError ENOSPC / EDQUOT."""
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "disk is full" in str(exc)
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def connect(path: Path, *, synchronous: str = "FULL") -> sqlite3.Connection:
    """Open the state database with the node's settings (WAL, synchronous, busy timeout) and the schema.

    The connection is in autocommit mode (``isolation_level=None``); use :func:`transaction` for writes.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.executescript(SCHEMA)
    for table, column, kind in MIGRATIONS:
        have = {r["name"] for r in conn.execute(f"PRAGMA table_info({table})")}
        if column not in have:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error): one state transition."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=int(row["id"]),
        study_instance_uid=row["study_instance_uid"],
        series_instance_uid=row["series_instance_uid"],
        run=int(row["run"]),
        state=JobState(row["state"]),
        attempts=int(row["attempts"]),
        reason=row["reason"],
        created_at=float(row["created_at"]),
        updated_at=float(row["updated_at"]),
        lease_expires_at=row["lease_expires_at"],
        failure_stage=FailureStage(row["failure_stage"]) if row["failure_stage"] else None,
        deferred_since=row["deferred_since"],
        deferrals=int(row["deferrals"] or 0),
    )


def _instance(row: sqlite3.Row) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=row["sop_instance_uid"],
        sop_class_uid=row["sop_class_uid"],
        study_instance_uid=row["study_instance_uid"],
        series_instance_uid=row["series_instance_uid"],
        transfer_syntax_uid=row["transfer_syntax_uid"],
        path=Path(row["path"]),
        size=int(row["size"]),
        calling_ae_title=row["calling_ae_title"],
        association_id=row["association_id"],
        received_at=float(row["received_at"]),
    )


@dataclass(frozen=True, slots=True)
class StoredInstance:
    """Outcome of :meth:`Database.add_instance`."""

    job_id: int | None
    """The open job (RECEIVED) the instance joined; None when it was only stored (policy ignore)."""
    run: int
    replaced: bool
    previous_path: Path | None
    """When a duplicate SOP Instance UID moved (another series): the old file, now unreferenced."""


@dataclass(frozen=True, slots=True)
class SeriesStats:
    """What completion needs to know about an open series (see completion.decide)."""

    series_instance_uid: str
    study_instance_uid: str
    job_id: int
    run: int
    instance_count: int
    last_arrival: float
    released_at: float | None
    """When the association that delivered the last instance was released (None: open, aborted or unknown)."""


class Database:
    """The daemon's handle on the state database: one connection, one lock, short transactions."""

    def __init__(self, path: Path, *, clock: Any = time.time) -> None:
        self.path = path
        self.clock = clock
        self._conn = connect(path)
        # Instance rows are committed without an fsync of their own (synchronous=NORMAL; in WAL mode a commit
        # still survives a crash of the process, only a power loss can drop the last ones). The instance's
        # file is fsync'd before its row is written, and start-up re-indexes spool files that have no row,
        # so a lost row is recovered from the durable file. Job transitions use the FULL connection.
        self._fast = connect(path, synchronous="NORMAL")
        self._lock = threading.RLock()

    def close(self) -> None:
        with self._lock:
            self._conn.close()
            self._fast.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock, transaction(self._conn) as conn:
            yield conn

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._conn.execute(sql, params).fetchall())

    # -- receive -------------------------------------------------------------------------------------------
    def add_instance(self, rec: InstanceRecord, facts: HeaderFacts, on_done: str = "rerun") -> StoredInstance:
        """Record one durably stored instance; opens the series' run (job RECEIVED) when needed. One tx."""
        now = rec.received_at
        with self._lock, transaction(self._fast) as c:
            series = c.execute(
                "SELECT state, run FROM series WHERE series_instance_uid=?", (rec.series_instance_uid,)
            ).fetchone()
            job_id: int | None = None
            if series is None:
                run = 1
                c.execute(
                    "INSERT INTO series (series_instance_uid, study_instance_uid, modality, state, run, "
                    "first_arrival, last_arrival) VALUES (?,?,?,?,?,?,?)",
                    (rec.series_instance_uid, rec.study_instance_uid, facts.modality, SERIES_RECEIVING, run, now, now),
                )
                job_id = self._new_job(c, rec, run, now)
            elif series["state"] == SERIES_RECEIVING:
                run = int(series["run"])
                row = c.execute(
                    "SELECT id FROM jobs WHERE series_instance_uid=? AND run=?", (rec.series_instance_uid, run)
                ).fetchone()
                job_id = int(row["id"]) if row else self._new_job(c, rec, run, now)
            elif on_done == "rerun":
                run = int(series["run"]) + 1
                c.execute(
                    "UPDATE series SET state=?, run=?, reason=NULL WHERE series_instance_uid=?",
                    (SERIES_RECEIVING, run, rec.series_instance_uid),
                )
                job_id = self._new_job(c, rec, run, now)
            else:
                run = int(series["run"])
            old = c.execute("SELECT path FROM instances WHERE sop_instance_uid=?", (rec.sop_instance_uid,)).fetchone()
            c.execute(
                "INSERT OR REPLACE INTO instances VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    rec.sop_instance_uid, rec.sop_class_uid, rec.study_instance_uid, rec.series_instance_uid,
                    rec.transfer_syntax_uid, str(rec.path), rec.size, rec.calling_ae_title, rec.association_id,
                    rec.received_at, facts.modality, facts.instance_number, facts.number_of_frames,
                    json.dumps(facts.position) if facts.position else None,
                    json.dumps(facts.orientation) if facts.orientation else None, run,
                ),
            )  # fmt: skip
            c.execute(
                "UPDATE series SET last_arrival=max(last_arrival, ?), last_association_id=?, released_at=NULL, "
                "instance_count=(SELECT count(*) FROM instances WHERE series_instance_uid=?), "
                "modality=coalesce(modality, ?) WHERE series_instance_uid=?",
                (now, rec.association_id, rec.series_instance_uid, facts.modality, rec.series_instance_uid),
            )
        previous = Path(old["path"]) if old is not None and old["path"] != str(rec.path) else None
        return StoredInstance(job_id=job_id, run=run, replaced=old is not None, previous_path=previous)

    def _new_job(self, c: sqlite3.Connection, rec: InstanceRecord, run: int, now: float) -> int:
        cur = c.execute(
            "INSERT INTO jobs (study_instance_uid, series_instance_uid, run, state, created_at, updated_at) "
            "VALUES (?,?,?,?,?,?)",
            (rec.study_instance_uid, rec.series_instance_uid, run, JobState.RECEIVED.value, now, now),
        )
        return int(cur.lastrowid or 0)

    def association_released(self, association_id: str, series_uids: Sequence[str], at: float) -> None:
        """The association that delivered these series was released normally (early completion may apply)."""
        if not series_uids:
            return
        with self.tx() as c:
            for uid in series_uids:
                c.execute(
                    "UPDATE series SET released_at=? WHERE series_instance_uid=? AND last_association_id=?",
                    (at, uid, association_id),
                )

    def record_event(
        self,
        kind: str,
        reason: str,
        *,
        calling_ae_title: str | None = None,
        association_id: str | None = None,
        sop_instance_uid: str | None = None,
        series_instance_uid: str | None = None,
        status: int | None = None,
        path: Path | None = None,
    ) -> None:
        with self.tx() as c:
            c.execute(
                "INSERT INTO events (at, kind, calling_ae_title, association_id, sop_instance_uid, "
                "series_instance_uid, status, reason, path) VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    self.clock(), kind, calling_ae_title, association_id, sop_instance_uid, series_instance_uid,
                    status, reason, str(path) if path else None,
                ),
            )  # fmt: skip

    def known_paths(self) -> set[str]:
        return {r["path"] for r in self.query("SELECT path FROM instances")}

    # -- operations (readiness, metrics) -------------------------------------------------------------------
    def heartbeat(self) -> None:
        """Commit one small write (the readiness probe's proof that the database takes writes); raises
        sqlite3.Error / OSError when it does not."""
        with self._lock, transaction(self._fast) as c:
            c.execute("INSERT OR REPLACE INTO heartbeat (id, at) VALUES (1, ?)", (self.clock(),))

    def job_state_counts(self) -> dict[JobState, int]:
        """Jobs per state, every state present (0 where none)."""
        counts = {state: 0 for state in JobState}
        for r in self.query("SELECT state, count(*) AS n FROM jobs GROUP BY state"):
            counts[JobState(r["state"])] = int(r["n"])
        return counts

    def series_runs_completed(self) -> int:
        """Series runs ever declared complete (every job past RECEIVED): a counter that survives restarts."""
        return int(self.query("SELECT count(*) AS n FROM jobs WHERE state != ?", (JobState.RECEIVED.value,))[0]["n"])

    def export_state_counts(self) -> dict[str, int]:
        """Outbox rows per state."""
        return {
            str(r["state"]): int(r["n"]) for r in self.query("SELECT state, count(*) AS n FROM outbox GROUP BY state")
        }

    # -- completion ----------------------------------------------------------------------------------------
    def open_series(self) -> list[SeriesStats]:
        rows = self.query(
            "SELECT s.series_instance_uid, s.study_instance_uid, s.run, s.instance_count, s.last_arrival, "
            "s.released_at, j.id AS job_id FROM series s JOIN jobs j "
            "ON j.series_instance_uid = s.series_instance_uid AND j.run = s.run "
            "WHERE s.state=? AND j.state=?",
            (SERIES_RECEIVING, JobState.RECEIVED.value),
        )
        return [
            SeriesStats(
                series_instance_uid=r["series_instance_uid"],
                study_instance_uid=r["study_instance_uid"],
                job_id=int(r["job_id"]),
                run=int(r["run"]),
                instance_count=int(r["instance_count"]),
                last_arrival=float(r["last_arrival"]),
                released_at=r["released_at"],
            )
            for r in rows
        ]

    def series_geometry(self, series_uid: str) -> tuple[list[list[float]], list[list[float]], int]:
        """(orientations, positions, multi-frame count) of a series' instances, from the stored header facts."""
        rows = self.query(
            "SELECT position, orientation, number_of_frames FROM instances WHERE series_instance_uid=?", (series_uid,)
        )
        orientations, positions, multi = [], [], 0
        for r in rows:
            if (r["number_of_frames"] or 1) > 1:
                multi += 1
            if r["position"] and r["orientation"]:
                positions.append(json.loads(r["position"]))
                orientations.append(json.loads(r["orientation"]))
        return orientations, positions, multi

    def complete_series(self, stats: SeriesStats, why: str) -> Job | None:
        """RECEIVED -> COMPLETE -> QUEUED, unless an instance arrived since ``stats`` was read. One tx each.
        Returns the job as it was before (for the transition log), or None when nothing moved."""
        with self.tx() as c:
            cur = c.execute(
                "UPDATE series SET state=? WHERE series_instance_uid=? AND run=? AND state=? AND last_arrival=?",
                (SERIES_PROCESSED, stats.series_instance_uid, stats.run, SERIES_RECEIVING, stats.last_arrival),
            )
            if cur.rowcount != 1:
                return None
            before = _job(c.execute("SELECT * FROM jobs WHERE id=?", (stats.job_id,)).fetchone())
            if not self._move(c, stats.job_id, JobState.COMPLETE, why):
                return None
        with self.tx() as c:
            self._move(c, stats.job_id, JobState.QUEUED, why, not_before=None)
        return before

    # -- jobs: every state change goes through _move, which holds it to dicom_node.jobs.TRANSITIONS ----------
    def _move(
        self,
        c: sqlite3.Connection,
        job_id: int,
        to: JobState,
        reason: str | None,
        *,
        expect: Sequence[JobState] | None = None,
        stage: FailureStage | None = None,
        not_before: float | None = None,
        lease_expires_at: float | None = None,
        attempts: str = "attempts",
    ) -> bool:
        """Move one job inside the open transaction ``c``: only from a state the state machine allows (and, when
        given, one of ``expect``). ``attempts`` is the SQL for the new attempt count. False if it did not move."""
        allowed = sources_of(to)
        if expect is not None:
            for frm in expect:
                check_transition(frm, to)
            allowed = allowed & frozenset(expect)
        if not allowed:
            return False
        states = sorted(st.value for st in allowed)
        cur = c.execute(
            f"UPDATE jobs SET state=?, reason=?, updated_at=?, not_before=?, lease_expires_at=?, failure_stage=?, "
            f"attempts={attempts} WHERE id=? AND state IN ({','.join('?' * len(states))})",
            [to.value, reason, self.clock(), not_before, lease_expires_at,
             stage.value if stage is not None and to is JobState.FAILED else None, job_id, *states],
        )  # fmt: skip
        return cur.rowcount == 1

    def record_burden(self, job_id: int, burden_json: str) -> None:
        """Store a job's burden numbers (JSON, ``inference.burden.Burden.as_dict``); a re-run replaces them."""
        with self.tx() as c:
            c.execute("UPDATE jobs SET burden=? WHERE id=?", (burden_json, job_id))

    def record_windows(self, job_id: int, total: int, run: int) -> None:
        """Store how many sliding windows tile the job's whole model grid and how many the backend ran."""
        with self.tx() as c:
            c.execute("UPDATE jobs SET windows_total=?, windows_run=? WHERE id=?", (total, run, job_id))

    def job(self, job_id: int) -> Job | None:
        rows = self.query("SELECT * FROM jobs WHERE id=?", (job_id,))
        return _job(rows[0]) if rows else None

    def jobs(self, state: JobState | None = None) -> list[Job]:
        if state is None:
            return [_job(r) for r in self.query("SELECT * FROM jobs ORDER BY id")]
        return [_job(r) for r in self.query("SELECT * FROM jobs WHERE state=? ORDER BY id", (state.value,))]

    def claim(self, lease_seconds: float) -> Job | None:
        """QUEUED -> INFERRING for the oldest due job: lease set and the attempt counted before the run."""
        now = self.clock()
        with self.tx() as c:
            row = c.execute(
                "SELECT id, reason FROM jobs WHERE state=? AND (not_before IS NULL OR not_before<=?) "
                "ORDER BY id LIMIT 1",
                (JobState.QUEUED.value, now),
            ).fetchone()
            if row is None:
                return None
            self._move(c, int(row["id"]), JobState.INFERRING, row["reason"], lease_expires_at=now + lease_seconds,
                       attempts="attempts+1")  # fmt: skip
            job = c.execute("SELECT * FROM jobs WHERE id=?", (row["id"],)).fetchone()
        return _job(job)

    def renew_lease(self, job_id: int, lease_seconds: float) -> None:
        with self.tx() as c:
            c.execute(
                "UPDATE jobs SET lease_expires_at=? WHERE id=? AND state=?",
                (self.clock() + lease_seconds, job_id, JobState.INFERRING.value),
            )

    def transition(
        self,
        job_id: int,
        to: JobState,
        reason: str | None = None,
        *,
        expect: Sequence[JobState] | None = None,
        stage: FailureStage | None = None,
        not_before: float | None = None,
    ) -> bool:
        """Move a job to ``to`` as the state machine allows (only from one of ``expect`` when given); ``stage``
        records where a FAILED job failed. One transaction. False if not moved."""
        with self.tx() as c:
            return self._move(c, job_id, to, reason, expect=expect, stage=stage, not_before=not_before)

    def defer(self, job_id: int, reason: str, *, not_before: float, since: float) -> bool:
        """INFERRING -> QUEUED without spending the attempt (the backend was unavailable): the claim's attempt is
        given back, ``since`` starts the wait unless one is running. One transaction."""
        with self.tx() as c:
            if not self._move(c, job_id, JobState.QUEUED, reason, expect=[JobState.INFERRING],
                              not_before=not_before, attempts="max(0, attempts-1)"):  # fmt: skip
                return False
            c.execute(
                "UPDATE jobs SET deferred_since=coalesce(deferred_since, ?), deferrals=deferrals+1 WHERE id=?",
                (since, job_id),
            )
        return True

    def requeue_expired(self, *, all_inferring: bool = False, max_attempts: int | None = None) -> list[int]:
        """INFERRING jobs whose lease lapsed (or all of them, at start-up) go back to QUEUED; those past
        ``max_attempts`` fail instead. Returns the ids moved."""
        now = self.clock()
        moved: list[int] = []
        with self.tx() as c:
            if all_inferring:
                rows = c.execute("SELECT id, attempts FROM jobs WHERE state=?", (JobState.INFERRING.value,))
            else:
                rows = c.execute(
                    "SELECT id, attempts FROM jobs WHERE state=? AND lease_expires_at<?",
                    (JobState.INFERRING.value, now),
                )
            for r in rows.fetchall():
                if max_attempts is not None and r["attempts"] >= max_attempts:
                    why = f"interrupted {r['attempts']} times (node stopped or worker lost); not retried again"
                    self._move(c, int(r["id"]), JobState.FAILED, why, stage=FailureStage.INTERRUPTED)
                else:
                    self._move(c, int(r["id"]), JobState.QUEUED, "lease expired: worker lost; re-queued")
                moved.append(int(r["id"]))
            # COMPLETE is a transient state between two transactions; finish it.
            for r in c.execute("SELECT id, reason FROM jobs WHERE state=?", (JobState.COMPLETE.value,)).fetchall():
                self._move(c, int(r["id"]), JobState.QUEUED, r["reason"])
        return moved

    def retry(self, job_id: int) -> Job:
        """A done, failed or skipped job back to QUEUED (attempts reset). KeyError / ValueError name the job."""
        with self.tx() as c:
            row = c.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                raise KeyError(f"job {job_id}: no such job")
            state = JobState(row["state"])
            if JobState.QUEUED not in TRANSITIONS[state]:
                raise ValueError(f"job {job_id}: is {state.value}, only failed, skipped or done jobs can be retried")
            why = f"retry requested (was {state.value}: {row['reason']})"
            self._move(c, job_id, JobState.QUEUED, why, attempts="0")
            c.execute("UPDATE jobs SET deferred_since=NULL, deferrals=0 WHERE id=?", (job_id,))
            job = c.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return _job(job)

    def manifest(self, job: Job) -> SeriesManifest:
        """The instances of a job's series as they stand (a rerun sees the whole series, replacements applied)."""
        rows = self.query(
            "SELECT * FROM instances WHERE series_instance_uid=? ORDER BY instance_number, sop_instance_uid",
            (job.series_instance_uid,),
        )
        return SeriesManifest(
            study_instance_uid=job.study_instance_uid,
            series_instance_uid=job.series_instance_uid,
            instances=tuple(_instance(r) for r in rows),
            run=job.run,
        )


# -- the outbox's tables ----------------------------------------------------------------------------------------

ExportState = Literal["pending", "sending", "delivered", "warning", "failed"]
ACCEPTED_EXPORT_STATES = ("delivered", "warning")


@dataclass(frozen=True, slots=True)
class ExportRow:
    """One (object, destination) pair of the outbox."""

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
    state: ExportState
    attempts: int
    next_attempt_at: float
    dimse_status: int | None
    reason: str | None
    created_at: float
    updated_at: float
    delivered_at: float | None
    resends: int
    """Sends a crash interrupted after they began: the destination may hold this object once more than the
    deliveries show (delivery is at least once)."""
    kind: str
    """The object: ``SEG``, ``SR`` or ``overlay`` (rows written before the SR and overlay existed say SEG)."""

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> ExportRow:
        return cls(**{k: row[k] for k in cls.__dataclass_fields__})


@dataclass(frozen=True, slots=True)
class ExportItem:
    """One object to send: what the outbox stores of it."""

    kind: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    path: Path


@dataclass(frozen=True, slots=True)
class ExportTarget:
    """Where one object goes: the outbox's key of the destination and how to reach it."""

    destination: str
    ae_title: str
    host: str
    port: int
    calling_ae_title: str


class ExportStore:
    """The outbox's SQL on one connection (the outbox gives each sender thread its own). Each method is one
    transaction; the outbox decides what to do, this class only says how it is stored."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    @classmethod
    def open(cls, path: Path) -> ExportStore:
        return cls(connect(path))

    def close(self) -> None:
        self.conn.close()

    def recover(self, now: float) -> tuple[int, list[int]]:
        """Rows found ``sending`` (a crash mid-send) back to ``pending``; unfinished announcements re-armed.
        Returns (rows recovered, every job id with rows)."""
        with transaction(self.conn) as c:
            n = c.execute(
                "UPDATE outbox SET state='pending', next_attempt_at=?, updated_at=?, resends=resends+1 "
                "WHERE state='sending'",
                (now, now),
            ).rowcount
            c.execute("UPDATE outbox_jobs SET notified=NULL WHERE notified LIKE 'announcing:%'")
            jobs = [int(r[0]) for r in c.execute("SELECT DISTINCT job_id FROM outbox")]
        return int(n), jobs

    def enqueue(self, job_id: int, items: Sequence[ExportItem], targets: Sequence[ExportTarget], now: float) -> None:
        """One row per (object, target), due now, in the order given, all in one transaction (so no outcome is
        announced for a job whose objects are only partly queued). A row that exists for the same (job, object,
        destination) is re-armed (pending, attempts reset) unless a send of it is in flight: a new enqueue means
        the job ran again and its results must reach every destination again."""
        with transaction(self.conn) as c:
            c.execute("INSERT OR IGNORE INTO outbox_jobs (job_id) VALUES (?)", (job_id,))
            c.execute("UPDATE outbox_jobs SET notified=NULL, notified_at=NULL WHERE job_id=?", (job_id,))
            for item, t in ((i, t) for i in items for t in targets):
                c.execute(
                    """INSERT INTO outbox (job_id, sop_instance_uid, series_instance_uid, study_instance_uid, path,
                           destination, dest_ae_title, dest_host, dest_port, calling_ae_title, state, attempts,
                           next_attempt_at, created_at, updated_at, kind)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', 0, ?, ?, ?, ?)
                       ON CONFLICT (job_id, sop_instance_uid, destination) DO UPDATE SET
                           path=excluded.path,
                           kind=excluded.kind,
                           state=CASE WHEN state='sending' THEN state ELSE 'pending' END,
                           attempts=CASE WHEN state='sending' THEN attempts ELSE 0 END,
                           next_attempt_at=excluded.next_attempt_at,
                           reason=CASE WHEN state='sending' THEN reason
                                       ELSE 're-queued by a new run of the job; previously ' || state ||
                                            COALESCE(': ' || reason, '') END,
                           updated_at=excluded.updated_at""",
                    (
                        job_id, item.sop_instance_uid, item.series_instance_uid, item.study_instance_uid,
                        str(item.path), t.destination, t.ae_title, t.host, t.port, t.calling_ae_title, now, now, now,
                        item.kind,
                    ),
                )  # fmt: skip

    def retry_failed(self, job_id: int, now: float) -> int:
        """The job's failed rows back to pending with a fresh attempt count; returns how many."""
        with transaction(self.conn) as c:
            n = c.execute(
                """UPDATE outbox SET state='pending', attempts=0, next_attempt_at=?, updated_at=?,
                       reason='retry requested; previously: ' || COALESCE(reason, '')
                   WHERE job_id=? AND state='failed'""",
                (now, now, job_id),
            ).rowcount
            if n:
                c.execute("UPDATE outbox_jobs SET notified=NULL, notified_at=NULL WHERE job_id=?", (job_id,))
        return int(n)

    def rows(self, job_id: int | None = None) -> list[ExportRow]:
        if job_id is None:
            cur = self.conn.execute("SELECT * FROM outbox ORDER BY id")
        else:
            cur = self.conn.execute("SELECT * FROM outbox WHERE job_id=? ORDER BY id", (job_id,))
        return [ExportRow.from_row(r) for r in cur.fetchall()]

    def claim(self, now: float, limit: int) -> tuple[list[ExportRow], float | None]:
        """The most overdue pending row whose destination has nothing in flight, and after it up to ``limit - 1``
        more due rows for the same destination and calling AE title in queue order (one association carries
        them), all now ``sending`` with their attempt counted, in one transaction; or ([], when the next pending
        row is due)."""
        with transaction(self.conn) as c:
            first = c.execute(
                """SELECT * FROM outbox
                   WHERE state='pending' AND next_attempt_at <= ?
                     AND destination NOT IN (SELECT destination FROM outbox WHERE state='sending')
                   ORDER BY next_attempt_at, id LIMIT 1""",
                (now,),
            ).fetchone()
            if first is None:
                nxt = c.execute("SELECT MIN(next_attempt_at) FROM outbox WHERE state='pending'").fetchone()[0]
                return [], None if nxt is None else float(nxt)
            more = c.execute(
                """SELECT id FROM outbox
                   WHERE state='pending' AND next_attempt_at <= ? AND destination=? AND calling_ae_title=?
                     AND id != ?
                   ORDER BY next_attempt_at, id LIMIT ?""",
                (now, first["destination"], first["calling_ae_title"], first["id"], limit - 1),
            ).fetchall()
            ids = [int(first["id"])] + [int(r["id"]) for r in more]
            marks = ",".join("?" * len(ids))
            c.execute(
                f"UPDATE outbox SET state='sending', attempts=attempts+1, updated_at=? WHERE id IN ({marks})",
                (now, *ids),
            )
            claimed = {int(r["id"]): r for r in c.execute(f"SELECT * FROM outbox WHERE id IN ({marks})", ids)}
        return [ExportRow.from_row(claimed[i]) for i in ids], None

    def release(self, row_ids: Sequence[int], next_attempt_at: float, now: float) -> None:
        """Claimed rows that were never tried (the association was lost before their turn, or the node is
        stopping) back to ``pending``, their attempt given back: only a send that was tried counts against
        ``export.max_attempts``."""
        if not row_ids:
            return
        marks = ",".join("?" * len(row_ids))
        with transaction(self.conn) as c:
            c.execute(
                f"UPDATE outbox SET state='pending', attempts=attempts-1, next_attempt_at=?, updated_at=? "
                f"WHERE state='sending' AND id IN ({marks})",
                (next_attempt_at, now, *row_ids),
            )

    def record_attempt(self, row_id: int, state: ExportState, next_attempt_at: float, dimse_status: int | None,
                       reason: str | None, now: float) -> None:  # fmt: skip
        with transaction(self.conn) as c:
            c.execute(
                """UPDATE outbox SET state=?, next_attempt_at=?, dimse_status=?, reason=?, updated_at=?,
                       delivered_at=CASE WHEN ? IN ('delivered', 'warning') THEN ? ELSE delivered_at END
                   WHERE id=?""",
                (state, next_attempt_at, dimse_status, reason, now, state, now, row_id),
            )

    def claim_announcement(self, job_id: int, outcome: str) -> bool:
        """Take the right to announce ``outcome`` for the job: False when it was announced, or is being."""
        with transaction(self.conn) as c:
            row = c.execute("SELECT notified FROM outbox_jobs WHERE job_id=?", (job_id,)).fetchone()
            current = None if row is None else row[0]
            if current is not None and (current == outcome or current.startswith("announcing:")):
                return False
            c.execute(
                "INSERT OR REPLACE INTO outbox_jobs (job_id, notified, notified_at) VALUES (?, ?, NULL)",
                (job_id, f"announcing:{outcome}"),
            )
        return True

    def finish_announcement(self, job_id: int, outcome: str | None, now: float) -> None:
        """Record the announcement (``outcome``), or None to announce it again later (the callback failed)."""
        with transaction(self.conn) as c:
            c.execute("UPDATE outbox_jobs SET notified=?, notified_at=? WHERE job_id=?", (outcome, now, job_id))
