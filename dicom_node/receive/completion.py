"""When is a series complete? A pure decision (:func:`decide`), and the loop that applies it
(:class:`CompletionMonitor`).

* After ``series.quiet_seconds`` with no new instance of it: complete ("quiet").
* Earlier, when ``series.complete_on_release`` is on, the association that delivered its last instance has been
  released normally, and its slices form one contiguous, evenly spaced, untilted stack (count and spacing
  agree; :func:`dicom_node.series.geometry.is_regular_stack`): complete ("released"). A multi-frame object (Enhanced
  CT) carries its whole geometry in one instance, so one released multi-frame instance completes too.
* Otherwise wait, and say until when at the latest.

A restarted node resumes the quiet timer from the stored last-arrival time (never from the restart), and no
association is open after a restart, so the quiet rule alone applies then.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from dicom_node.db import Database, SeriesStats
from dicom_node.jobs import JobState, log_transition
from dicom_node.series.geometry import is_regular_stack
from dicom_node.settings import SeriesSection, Settings

log = logging.getLogger(__name__)


class Verdict(StrEnum):
    WAIT = "wait"
    COMPLETE = "complete"


@dataclass(frozen=True, slots=True)
class CompletionStats:
    """What is known about an open series run."""

    instance_count: int
    last_arrival: float
    released: bool
    """The association that delivered the last instance was released normally (not aborted, not still open)."""
    orientations: Sequence[Sequence[float]] = ()
    positions: Sequence[Sequence[float]] = ()
    """Per single-frame instance with geometry in its header (may be fewer than instance_count)."""
    multiframe_instances: int = 0


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    reason: str
    recheck_at: float | None = None
    """When waiting: the latest time to look again (the quiet deadline)."""

    @property
    def complete(self) -> bool:
        return self.verdict is Verdict.COMPLETE


def _regular(stats: CompletionStats, tolerance: float) -> bool:
    if stats.instance_count <= 0:
        return False
    if stats.multiframe_instances:
        return stats.multiframe_instances == 1 and stats.instance_count == 1
    if len(stats.positions) != stats.instance_count or len(stats.orientations) != stats.instance_count:
        return False  # some slices lack geometry: let the quiet timer decide
    return bool(is_regular_stack(stats.orientations, stats.positions, tolerance))


def decide(stats: CompletionStats, now: float, policy: SeriesSection, spacing_tolerance: float = 0.1) -> Decision:
    """Complete or wait, with the reason (recorded on the job when it completes)."""
    deadline = stats.last_arrival + policy.quiet_seconds
    if now >= deadline:
        return Decision(
            Verdict.COMPLETE,
            f"quiet: no new instance for {now - stats.last_arrival:.1f} s (series.quiet_seconds="
            f"{policy.quiet_seconds:g}); {stats.instance_count} instances",
        )
    if policy.complete_on_release and stats.released and _regular(stats, spacing_tolerance):
        return Decision(
            Verdict.COMPLETE,
            f"released: delivering association released and {stats.instance_count} instances form a regular stack",
        )
    return Decision(Verdict.WAIT, "waiting for more instances", recheck_at=deadline)


class CompletionMonitor:
    """Applies :func:`decide` to every open series every ``series.poll_interval_s`` (or at once when kicked: an
    association was released), moving each complete one's job RECEIVED -> COMPLETE -> QUEUED.

    ``on_queued`` is called when jobs were queued (the worker pool looks at the queue then).
    """

    def __init__(self, settings: Settings, db: Database, on_queued: Callable[[], None]) -> None:
        self.settings = settings
        self.db = db
        self.on_queued = on_queued
        self._stop = threading.Event()
        self._kick = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="completion", daemon=True)
        self._thread.start()

    def kick(self) -> None:
        """Look now (an association was released: its series may be complete)."""
        self._kick.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._kick.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        poll = self.settings.series.poll_interval_s
        while not self._stop.is_set():
            try:
                self.check(time.time())
            except Exception:
                log.exception("completion loop error")
            self._kick.wait(poll)
            self._kick.clear()

    def check(self, now: float) -> int:
        """Declare complete what is due at ``now``; returns how many series completed."""
        done = 0
        for s in self.db.open_series():
            decision = decide(self._stats(s), now, self.settings.series, self.settings.reconstruction.spacing_tolerance)
            if not decision.complete:
                continue
            job = self.db.complete_series(s, decision.reason)
            if job is not None:
                done += 1
                log_transition(job, JobState.COMPLETE, decision.reason)
                log_transition(job, JobState.QUEUED, None)
        if done:
            self.on_queued()
        return done

    def _stats(self, s: SeriesStats) -> CompletionStats:
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
