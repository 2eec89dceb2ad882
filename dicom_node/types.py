"""Small typed records that cross stage boundaries. No I/O here.

receive -> ``InstanceRecord`` -> series tracking -> ``SeriesManifest`` -> reconstruction -> ``CTVolume``
-> inference (label image) -> SEG writer -> ``SegArtifact`` -> outbox -> ``SendResult``; a ``Job`` row tracks
which stage a series run is in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import SimpleITK as sitk


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


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """One stored instance: where its bytes are and the header facts routing needs (no pixel data read)."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    path: Path
    """Absolute path of the stored file in the spool (immutable once renamed into place)."""
    size: int
    calling_ae_title: str
    association_id: str
    received_at: float
    """Unix time the bytes were durably stored."""


@dataclass(frozen=True, slots=True)
class SeriesManifest:
    """A series as the tracker sees it when it is declared complete: the instances of one run."""

    study_instance_uid: str
    series_instance_uid: str
    instances: tuple[InstanceRecord, ...]
    run: int = 1
    """1 for the first processing of the series, 2 for a rerun after new instances arrived, ..."""


@dataclass(frozen=True, slots=True)
class SourceInstance:
    """A source image the SEG must reference, in the order of the reconstructed volume's slices."""

    sop_class_uid: str
    sop_instance_uid: str
    path: Path
    frame_number: int | None = None
    """1-based frame for a multi-frame (Enhanced CT) source; None for single-frame instances."""


@dataclass(frozen=True)
class CTVolume:
    """A reconstructed CT volume in HU with LPS geometry, and what it was made from.

    ``image`` is a 3-D SimpleITK image (float32 HU); its origin, spacing and direction are the patient geometry
    in LPS millimetres. ``sources`` lists the source frames along the slice normal. When reconstruction had to
    resample (gantry tilt, uneven steps), ``image``'s slices no longer match ``sources`` one-to-one and
    ``resampled`` says why; consumers map back through geometry, never by index.
    """

    image: sitk.Image
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    sources: tuple[SourceInstance, ...]
    resampled: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True, slots=True)
class SegArtifact:
    """A SEG written to disk, ready for the outbox."""

    path: Path
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    segment_voxels: int
    """Non-zero voxels in the mask; 0 means the run found nothing ("no finding" SEG)."""


class SendStatus(StrEnum):
    SUCCESS = "success"
    WARNING = "warning"
    RETRY = "retry"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class SendResult:
    """Outcome of one C-STORE of one object to one destination."""

    destination: str
    status: SendStatus
    dimse_status: int | None
    reason: str
