"""Small typed records that cross stage boundaries. No I/O here.

receive -> ``InstanceRecord`` -> series tracking -> ``SeriesManifest`` -> reconstruction -> ``CTVolume``
-> inference (label image) -> SEG writer -> ``SegArtifact`` (and the SR and overlay writers -> ``DicomArtifact``)
-> outbox -> ``SendResult``; a ``Job`` row (:mod:`dicom_node.jobs`) tracks which stage a series run is in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import ClassVar

import SimpleITK as sitk
from pydicom.dataset import Dataset


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
class FramePlane:
    """Where one frame's pixels lie in patient space (LPS mm), as its header states it.

    The plane maths on it (directions, normals, sampling) is :mod:`dicom_node.series.geometry`'s.
    """

    position: tuple[float, float, float]
    """ImagePositionPatient: the centre of the first (top left) pixel."""
    orientation: tuple[float, float, float, float, float, float]
    """ImageOrientationPatient: row direction (column index increases), then column direction."""
    pixel_spacing: tuple[float, float]
    """DICOM order: (row spacing = dy between rows, column spacing = dx between columns), mm."""
    rows: int
    columns: int


@dataclass(frozen=True, slots=True)
class HeaderFacts:
    """What the receive path records of an instance's header (never the pixels); None where it is absent."""

    modality: str | None = None
    instance_number: int | None = None
    number_of_frames: int | None = None
    position: tuple[float, float, float] | None = None
    orientation: tuple[float, float, float, float, float, float] | None = None


@dataclass(frozen=True, slots=True)
class SourceInstance:
    """A source frame the SEG must reference, in the order of the reconstructed volume's slices.

    It carries its plane and its instance's header (read once, before pixel data), so the output writers need
    neither to read the sources again nor to recompute where each frame lies.
    """

    sop_class_uid: str
    sop_instance_uid: str
    path: Path
    frame_number: int | None
    """1-based frame for a multi-frame (Enhanced CT) source; None for single-frame instances."""
    plane: FramePlane
    header: Dataset = field(compare=False, repr=False)
    """The instance's header (no pixel data), shared by the frames of one multi-frame instance."""


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
    segment_numbers: tuple[tuple[int, int], ...] = ()
    """(label value, segment number) of each segment: what an SR that references a segment needs."""
    kind: ClassVar[str] = "SEG"


@dataclass(frozen=True, slots=True)
class DicomArtifact:
    """Another DICOM object a job wrote (the SR, an overlay image), ready for the outbox."""

    kind: str
    """What it is, for the outbox and ``dicom-node status``: ``SR`` or ``overlay``."""
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str


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
