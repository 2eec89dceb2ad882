"""When is a series complete? A pure decision, so it can be tested without a network or a clock.

* After ``series.quiet_seconds`` with no new instance of it: complete ("quiet").
* Earlier, when ``series.complete_on_release`` is on, the association that delivered its last instance has been
  released normally, and its slices form one contiguous, evenly spaced, untilted stack (count and spacing
  agree; :func:`dicom_node.geometry.is_regular_stack`): complete ("released"). A multi-frame object (Enhanced
  CT) carries its whole geometry in one instance, so one released multi-frame instance completes too.
* Otherwise wait, and say until when at the latest.

A restarted node resumes the quiet timer from the stored last-arrival time (never from the restart), and no
association is open after a restart, so the quiet rule alone applies then.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from dicom_node.settings import SeriesSection


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
    from dicom_node.geometry import is_regular_stack

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
