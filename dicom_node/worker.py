"""The job queue's worker pool, and the contract of whatever processes a job.

A worker claims the oldest due QUEUED job (QUEUED -> INFERRING, lease set, attempt counted *before* the run, one
transaction), hands it with its manifest to the :class:`JobProcessor`, and records the :class:`JobOutcome` as
one transition:

* ``done``                 -> DONE
* ``exporting``            -> EXPORTING (the outbox moves it to DONE / FAILED when the sends finish)
* ``skipped(reason)``      -> SKIPPED with the reason (selection said no; inputs kept)
* ``failed(reason, stage, retryable=True)`` -> QUEUED again after ``workers.backoff`` while attempts <
  workers.max_attempts, else FAILED; ``retryable=False`` -> FAILED at once, with the stage that failed recorded.
  Inputs are never deleted, so ``dicom-node retry`` works.

An exception escaping the processor counts as ``failed(retryable=False)`` for ``Rejected`` and retryable for
anything else (``Transient``, bugs). The lease is renewed while the processor runs; a worker that vanishes
(kill -9) leaves an INFERRING job whose lease lapses, and the daemon puts it back in the queue.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Sequence
from typing import Protocol

from dicom_node.db import Database
from dicom_node.errors import Rejected
from dicom_node.jobs import FailureStage, Job, JobOutcome, JobState, log_transition
from dicom_node.ops.metrics import NodeMetrics
from dicom_node.settings import Settings
from dicom_node.types import InstanceRecord, SeriesManifest
from inference.triton_fleet import EndpointState

log = logging.getLogger(__name__)


class JobProcessor(Protocol):
    """What the node runs jobs with: the whole contract, no optional parts.

    ``start`` / ``stop`` bracket the node's life (open the model backend, the outbox; close them);
    ``on_stored`` is called by the SCP for each instance once it is durable (it must only queue work, never do it
    in the association's thread); ``process`` turns one claimed job into an outcome, from worker threads (one job
    per call, several at once); ``backend_problem`` is the readiness probe's question (None: whatever the jobs
    need, a model backend for instance, is ready; else why not), answered at once, never blocking.
    """

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def on_stored(self, record: InstanceRecord) -> None: ...

    def process(self, job: Job, manifest: SeriesManifest) -> JobOutcome: ...

    def backend_problem(self) -> str | None: ...

    def backend_endpoints(self) -> Sequence[EndpointState]: ...


class WorkerPool:
    """``workers.count`` threads that claim and process jobs until stopped."""

    def __init__(
        self, settings: Settings, db: Database, processor: JobProcessor, metrics: NodeMetrics | None = None
    ) -> None:
        self.settings = settings
        self.db = db
        self.processor = processor
        self.metrics = metrics or NodeMetrics()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._busy = 0
        self._busy_lock = threading.Lock()

    LEASE_CHECK_S = 5.0
    """How often lapsed leases (a worker that vanished) are looked for."""

    def start(self) -> None:
        for i in range(self.settings.workers.count):
            t = threading.Thread(target=self._run, name=f"job-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        t = threading.Thread(target=self._watch_leases, name="job-leases", daemon=True)
        t.start()
        self._threads.append(t)

    def _watch_leases(self) -> None:
        """Put jobs whose lease lapsed back in the queue (or fail them past workers.max_attempts)."""
        while not self._stop.wait(self.LEASE_CHECK_S):
            try:
                moved = self.db.requeue_expired(max_attempts=self.settings.workers.max_attempts)
            except Exception:
                log.exception("cannot re-queue jobs whose lease lapsed")
                continue
            if moved:
                log.warning("leases expired; jobs re-queued", extra={"jobs": moved})
                self.wake()

    def wake(self) -> None:
        """Look at the queue now (a job was queued)."""
        self._wake.set()

    @property
    def busy(self) -> int:
        return self._busy

    def stop(self, timeout: float = 30.0) -> bool:
        """Stop claiming; wait up to ``timeout`` for running jobs. False if some are still running (their lease
        then brings them back to the queue on the next start)."""
        self._stop.set()
        self._wake.set()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def _run(self) -> None:
        poll = self.settings.series.poll_interval_s
        while not self._stop.is_set():
            try:
                ran = self.run_one()
            except Exception:
                log.exception("worker error")
                ran = False
            if not ran:
                self._wake.wait(poll)
                self._wake.clear()

    def run_one(self) -> bool:
        """Claim and process one job; False when nothing was due."""
        wk = self.settings.workers
        job = self.db.claim(wk.lease_seconds)
        if job is None:
            return False
        with self._busy_lock:
            self._busy += 1
        log_transition(job, JobState.INFERRING, f"attempt {job.attempts}")
        renew_stop = threading.Event()
        renewer = threading.Thread(target=self._renew, args=(job.id, renew_stop), daemon=True)
        renewer.start()
        try:
            outcome = self._process(job)
        finally:
            renew_stop.set()
            with self._busy_lock:
                self._busy -= 1
        self._record_durably(job, outcome)
        return True

    RECORD_RETRY_S = 2.0
    """How often a worker tries again to record an outcome the database refused (a full disk)."""

    def _record_durably(self, job: Job, outcome: JobOutcome) -> None:
        """Record the outcome; when the database cannot take it (disk full), put the job back in the queue with
        the backoff instead, trying until one of the two is stored, so the job never waits for its lease."""
        try:
            self.record(job, outcome)
            requeued = outcome.state is JobState.FAILED and outcome.retryable
            self.metrics.job_outcome(outcome, requeued=requeued and job.attempts < self.settings.workers.max_attempts)
            return
        except (sqlite3.Error, OSError) as exc:
            log.error(f"job {job.id}: cannot record outcome {outcome.state.value}: {exc}", extra={"job_id": job.id})
        reason = f"attempt {job.attempts}: the state database could not record the outcome ({outcome.reason})"
        while not self._stop.is_set():
            try:
                wait = self.settings.workers.backoff.delay(job.attempts)
                if self.db.transition(job.id, JobState.QUEUED, f"{reason}; retry in {wait:g} s",
                                      expect=[JobState.INFERRING], not_before=time.time() + wait):  # fmt: skip
                    log_transition(job, JobState.QUEUED, reason, logging.WARNING)
                return
            except (sqlite3.Error, OSError) as exc:
                log.warning(f"job {job.id}: cannot re-queue either, trying again: {exc}", extra={"job_id": job.id})
            self._stop.wait(self.RECORD_RETRY_S)

    def _renew(self, job_id: int, stop: threading.Event) -> None:
        lease = self.settings.workers.lease_seconds
        while not stop.wait(max(1.0, lease / 3)):
            try:
                self.db.renew_lease(job_id, lease)
            except Exception:
                log.exception("cannot renew lease", extra={"job_id": job_id})

    def _process(self, job: Job) -> JobOutcome:
        try:
            manifest = self.db.manifest(job)
            if not manifest.instances:
                return JobOutcome.failed("no stored instance belongs to this series", FailureStage.INPUT)
            return self.processor.process(job, manifest)
        except Rejected as exc:
            return JobOutcome.failed(str(exc), FailureStage.INPUT)
        except Exception as exc:
            log.exception("job processor raised", extra={"job_id": job.id})
            return JobOutcome.failed(f"{type(exc).__name__}: {exc}", FailureStage.INTERNAL, retryable=True)

    def _defer(self, job: Job, outcome: JobOutcome) -> None:
        """Hold a job whose backend is unavailable: back in the queue with the backoff, its attempt given back,
        until ``workers.backend_max_wait_s`` has passed since it first found the backend down."""
        wk = self.settings.workers
        now = time.time()
        since = job.deferred_since if job.deferred_since is not None else now
        waited = now - since
        if waited >= wk.backend_max_wait_s:
            reason = (
                f"{outcome.reason}; still unavailable after waiting {waited:.0f} s "
                f"(workers.backend_max_wait_s={wk.backend_max_wait_s:g})"
            )
            if self.db.transition(job.id, JobState.FAILED, reason, expect=[JobState.INFERRING],
                                  stage=FailureStage.INFERENCE):  # fmt: skip
                log_transition(job, JobState.FAILED, reason, logging.WARNING)
            return
        wait = min(wk.backoff.delay(job.deferrals + 1), max(0.0, wk.backend_max_wait_s - waited))
        msg = f"waiting for the inference backend (no attempt spent; look again in {wait:.1f} s): {outcome.reason}"
        if self.db.defer(job.id, msg, not_before=now + wait, since=since):
            log_transition(job, JobState.QUEUED, msg, logging.WARNING)

    def record(self, job: Job, outcome: JobOutcome) -> None:
        """The outcome as one transition of the job (a retryable failure back to the queue after a backoff)."""
        wk = self.settings.workers
        expect = [JobState.INFERRING]
        if outcome.deferred:
            self._defer(job, outcome)
            return
        if outcome.state is JobState.FAILED and outcome.retryable and job.attempts < wk.max_attempts:
            wait = wk.backoff.delay(job.attempts)
            msg = f"attempt {job.attempts} failed, retry in {wait:g} s: {outcome.reason}"
            self.db.transition(job.id, JobState.QUEUED, msg, expect=expect, not_before=time.time() + wait)
            log_transition(job, JobState.QUEUED, msg, logging.WARNING)
            return
        reason: str | None = outcome.reason
        if outcome.state is JobState.FAILED and outcome.retryable:
            reason = f"failed after {job.attempts} attempts: {outcome.reason}"
        if not self.db.transition(job.id, outcome.state, reason, expect=expect, stage=outcome.stage):
            now = self.db.job(job.id)
            if outcome.state is JobState.EXPORTING and now is not None and now.state.terminal:
                return  # the outbox settled the export before this outcome was recorded
            log.warning(f"job {job.id}: state changed while it ran; outcome {outcome.state.value} not recorded",
                        extra={"job_id": job.id})  # fmt: skip
            return
        level = logging.WARNING if outcome.state in (JobState.FAILED, JobState.SKIPPED) else logging.INFO
        log_transition(job, outcome.state, reason, level)
