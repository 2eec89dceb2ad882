"""A job's results besides the SEG, as the settings ask for them: the burden report (SR), the overlay series and
the preview PNG, written into the job's results folder.

Every object is derived from the same inputs the SEG was (the volume, its label, the burden numbers) and lies
on the source planes (:class:`dicom_node.export.sources.SourcePlanes`), computed once for the overlay and the
preview. The DICOM objects come back in the order the outbox should send them: the SR (it references the SEG,
which is queued first), then the overlay images in slice order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from dicom_node.export.overlay import write_overlay
from dicom_node.export.preview import write_preview
from dicom_node.export.render import Window
from dicom_node.export.sources import SourcePlanes
from dicom_node.export.sr_writer import write_sr
from dicom_node.settings import Settings
from dicom_node.types import CTVolume, DicomArtifact, SegArtifact
from inference.burden import Burden
from inference.spec import InferenceSpec

log = logging.getLogger(__name__)

Stage = Callable[[str], AbstractContextManager[None]]
"""Times a named stage of the job (``JobTimings.stage``)."""

PREVIEW_NAME = "preview.png"
SR_NAME = "sr.dcm"
OVERLAY_FOLDER = "overlay"


@dataclass(frozen=True, slots=True)
class DerivedResults:
    """What :func:`write_derived` wrote."""

    objects: tuple[DicomArtifact, ...]
    """The DICOM objects to send after the SEG, in sending order."""
    preview: Path | None

    def describe(self) -> str:
        """A short account for the job's reason, e.g. ``SR, 12 overlay images, preview``."""
        kinds = [o.kind for o in self.objects]
        parts = ["SR"] * kinds.count("SR")
        if "overlay" in kinds:
            parts.append(f"{kinds.count('overlay')} overlay images")
        if self.preview is not None:
            parts.append("preview")
        return ", ".join(parts)


def write_derived(
    volume: CTVolume,
    label: sitk.Image,
    seg: SegArtifact,
    burden: Burden | None,
    *,
    ggo_labels: tuple[int, ...],
    spec: InferenceSpec,
    settings: Settings,
    out_dir: Path,
    stage: Stage,
) -> DerivedResults:
    """Write the SR, overlay and preview that ``settings`` enable for the job whose SEG is ``seg``.

    The SR needs the burden numbers: without them (a model spec without lung fields) it is left out, and said
    so in the log. Raises ``Rejected`` for sources the writers cannot use, ``OSError`` when the disk refuses.
    """
    name, version = spec.model.name, spec.model.version
    objects: list[DicomArtifact] = []
    if settings.sr.enabled:
        if burden is None:
            log.warning(
                "SR not written: no burden numbers (the model spec has no post_transforms.lung_fields)",
                extra={"series_instance_uid": volume.series_instance_uid, "seg_sop_instance_uid": seg.sop_instance_uid},
            )
        else:
            with stage("sr_encode"):
                objects.append(
                    write_sr(
                        volume, seg, burden, ggo_labels=ggo_labels, algorithm_name=name, algorithm_version=version,
                        sr=settings.sr, equipment=settings.seg, out_path=out_dir / SR_NAME,
                    )
                )  # fmt: skip
    preview: Path | None = None
    if settings.overlay.enabled or settings.preview.enabled:
        with stage("source_planes"):
            planes = SourcePlanes(volume)
            masks = planes.labels(label)
            if {s.label for s in spec.segments} != set(ggo_labels):  # other segments too: keep ground glass only
                masks = np.isin(masks, ggo_labels).view(np.uint8)
        if settings.overlay.enabled:
            with stage("overlay_encode"):
                objects += write_overlay(
                    planes, masks, burden, algorithm_name=name, algorithm_version=version, overlay=settings.overlay,
                    equipment=settings.seg, out_dir=out_dir / OVERLAY_FOLDER,
                )  # fmt: skip
        if settings.preview.enabled:
            with stage("preview"):
                preview = write_preview(
                    planes, masks, burden,
                    window=Window(settings.overlay.window_center, settings.overlay.window_width),
                    count=settings.preview.key_slices, title=f"AI ground glass, {name} {version}",
                    out_path=out_dir / PREVIEW_NAME,
                )  # fmt: skip
    return DerivedResults(tuple(objects), preview)


__all__ = ["OVERLAY_FOLDER", "PREVIEW_NAME", "SR_NAME", "DerivedResults", "write_derived"]
