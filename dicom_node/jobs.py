"""The job state machine: a job's record, its states, the transitions allowed between them, and its outcomes.

One job is one run of one series. The states and every allowed move are declared here once
(:data:`TRANSITIONS`); the database layer refuses any other move (:meth:`dicom_node.db.Database.transition`
checks the table inside the transaction), and every move is logged through :func:`log_transition`.

::

    RECEIVED --complete--> COMPLETE --queue--> QUEUED --claim--> INFERRING --+--> EXPORTING --> DONE | FAILED
                                                 ^                           +--> DONE | SKIPPED | FAILED
                                                 |                           +--> QUEUED (retryable failure,
                                                 |                                 lease lost, restart)
                                                 +---- retry ---- DONE | SKIPPED | FAILED
                                                      FAILED (export stage) --resend--> EXPORTING

A failed job says where it failed in its own column (:class:`FailureStage`), so ``dicom-node retry`` decides
between re-sending and re-running from that column, never from the wording of the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from dicom_node.errors import NodeError

log = logging.getLogger(__name__)


class JobState(StrEnum):
    """Life of one run of one series. Terminal states: DONE, SKIPPED, FAILED."""

    RECEIVED = "received"
    COMPLETE = "complete"
    QUEUED = "queued"
    INFERRING = "inferring"
    EXPORTING = "exporting"
    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in (JobState.DONE, JobState.SKIPPED, JobState.FAILED)


class FailureStage(StrEnum):
    """Where a FAILED job failed (the ``failure_stage`` column)."""

    INPUT = "input"
    """The series itself: unreadable, undecodable, geometry the node refuses, no instance left."""
    INFERENCE = "inference"
    """The model backend refused the work, or stayed unavailable through every attempt."""
    OUTPUT = "output"
    """Writing the job's results (the SEG) failed."""
    EXPORT = "export"
    """A destination refused the results for good, or could not be reached within export.max_attempts: the
    results exist, so a retry only re-sends them."""
    INTERRUPTED = "interrupted"
    """The node stopped (or its worker vanished) during every attempt."""
    INTERNAL = "internal"
    """An unexpected error in the node (a bug): the log has the traceback."""


TRANSITIONS: Mapping[JobState, frozenset[JobState]] = {
    JobState.RECEIVED: frozenset({JobState.COMPLETE}),
    JobState.COMPLETE: frozenset({JobState.QUEUED}),
    JobState.QUEUED: frozenset({JobState.INFERRING}),
    JobState.INFERRING: frozenset(
        {JobState.QUEUED, JobState.EXPORTING, JobState.DONE, JobState.SKIPPED, JobState.FAILED}
    ),
    # The outbox settles a job; it may do so before the worker recorded EXPORTING (INFERRING -> DONE/FAILED
    # above), and a failed export that a re-send delivers ends DONE.
    JobState.EXPORTING: frozenset({JobState.DONE, JobState.FAILED}),
    JobState.DONE: frozenset({JobState.QUEUED}),
    JobState.SKIPPED: frozenset({JobState.QUEUED}),
    JobState.FAILED: frozenset({JobState.QUEUED, JobState.EXPORTING, JobState.DONE}),
}
"""Every allowed move, from -> to. Nothing else changes a job's state."""


def sources_of(to: JobState) -> frozenset[JobState]:
    """The states a job may be in to move to ``to``."""
    return frozenset(s for s, targets in TRANSITIONS.items() if to in targets)


class IllegalTransition(NodeError):
    """A caller asked for a move the state machine does not allow (a bug in the caller)."""


def check_transition(frm: JobState, to: JobState) -> None:
    if to not in TRANSITIONS[frm]:
        allowed = ", ".join(sorted(s.value for s in TRANSITIONS[frm])) or "nothing"
        raise IllegalTransition(f"job state {frm.value} -> {to.value} is not allowed (from {frm.value}: {allowed})")


@dataclass(frozen=True, slots=True)
class Job:
    """One run of one series in the persistent queue (a row of the ``jobs`` table)."""

    id: int
    study_instance_uid: str
    series_instance_uid: str
    run: int
    state: JobState
    attempts: int
    reason: str | None
    created_at: float
    updated_at: float
    lease_expires_at: float | None = None
    """While INFERRING: when the claim lapses and the job goes back to the queue."""
    failure_stage: FailureStage | None = None
    """Where a FAILED job failed; None otherwise."""
    deferred_since: float | None = None
    """When the job first found the model backend unavailable in its current wait (None: not waiting)."""
    deferrals: int = 0
    """How often it was put back because the backend was unavailable (no attempt spent for those)."""


@dataclass(frozen=True, slots=True)
class JobOutcome:
    """What a processor made of a job. Build with the class methods."""

    state: JobState
    """DONE, EXPORTING, SKIPPED, FAILED, or QUEUED (deferred)."""
    reason: str | None = None
    retryable: bool = False
    stage: FailureStage | None = None
    """For FAILED: where."""
    deferred: bool = False
    """The job could not run because a service it needs (the model backend) is unavailable: back in the queue
    without spending an attempt, until it is back or ``workers.backend_max_wait_s`` passes."""

    @classmethod
    def done(cls, reason: str | None = None) -> JobOutcome:
        return cls(JobState.DONE, reason)

    @classmethod
    def exporting(cls, reason: str | None = None) -> JobOutcome:
        return cls(JobState.EXPORTING, reason)

    @classmethod
    def skipped(cls, reason: str) -> JobOutcome:
        return cls(JobState.SKIPPED, reason)

    @classmethod
    def failed(cls, reason: str, stage: FailureStage, *, retryable: bool = False) -> JobOutcome:
        return cls(JobState.FAILED, reason, retryable, stage)

    @classmethod
    def unavailable(cls, reason: str) -> JobOutcome:
        """The model backend cannot be reached: hold the job (see ``deferred``)."""
        return cls(JobState.QUEUED, reason, True, FailureStage.INFERENCE, deferred=True)


def log_transition(job: Job, to: JobState, reason: str | None, level: int = logging.INFO) -> None:
    """One log line per job transition, with the job's fields."""
    log.log(
        level,
        f"job {job.id} -> {to.value}" + (f": {reason}" if reason else ""),
        extra={
            "job_id": job.id, "state": to.value, "series_uid": job.series_instance_uid,
            "study_uid": job.study_instance_uid, "run": job.run, "attempts": job.attempts, "reason": reason,
        },
    )  # fmt: skip


__all__ = [
    "TRANSITIONS",
    "FailureStage",
    "IllegalTransition",
    "Job",
    "JobOutcome",
    "JobState",
    "check_transition",
    "log_transition",
    "sources_of",
]
