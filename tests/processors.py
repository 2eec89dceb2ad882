"""Test doubles of the job processor (:class:`dicom_node.worker.JobProcessor`): they live here, not in the node."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dicom_node.daemon import Node
from dicom_node.errors import Rejected
from dicom_node.jobs import FailureStage, Job, JobOutcome
from dicom_node.series.reconstruct import reconstruct
from dicom_node.series.selection import select_series
from dicom_node.settings import Settings
from dicom_node.types import CTVolume, InstanceRecord, SeriesManifest


class ReconstructingProcessor:
    """Selection and reconstruction, no inference: reception tests stop at the volume, which they look at."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.volumes: dict[int, CTVolume] = {}
        """Job id -> the reconstructed volume."""
        self.stored: list[InstanceRecord] = []
        self.started = self.stopped = False

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        self.stopped = True

    def on_stored(self, record: InstanceRecord) -> None:
        self.stored.append(record)

    def backend_problem(self) -> str | None:
        return None  # no model backend: reconstruction only

    def backend_endpoints(self) -> tuple[()]:
        return ()

    def process(self, job: Job, manifest: SeriesManifest) -> JobOutcome:
        verdict = select_series(manifest, self.settings.selection)
        if not verdict.selected:
            return JobOutcome.skipped(str(verdict.reason))
        try:
            volume = reconstruct(manifest, self.settings.reconstruction)
        except Rejected as exc:
            return JobOutcome.failed(str(exc), FailureStage.INPUT)
        self.volumes[job.id] = volume
        size = volume.image.GetSize()
        return JobOutcome.done(f"reconstructed {size[0]}x{size[1]}x{size[2]} volume (no inference in this processor)")


@contextlib.contextmanager
def running_node(storage: Path, /, **sections: Any) -> Iterator[Node]:
    """An in-process node on a free port that stops at reconstruction (the production processor, with inference
    and SEG, is tested end to end in test_end_to_end.py)."""
    from tests.dimse import free_port, settings_for

    settings = settings_for(storage, free_port(), **sections)
    node = Node(settings, processor=ReconstructingProcessor(settings))
    node.start()
    try:
        yield node
    finally:
        node.stop(grace_s=5)
