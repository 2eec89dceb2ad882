"""A complete series -> a CT volume in HU with LPS geometry, or ``Rejected`` with the reason.

Three steps, each a module: :mod:`~dicom_node.series.plan` (headers only: checks, sort, duplicates, tilt,
spacing), :mod:`~dicom_node.series.decode` (pixels, rescaled to HU), :mod:`~dicom_node.series.resample` (onto a
regular grid, as a SimpleITK image). :func:`plan_series` alone runs every check that needs no pixel, so a caller
can refuse a series before paying for decoding; :func:`build_volume` does the rest.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from pydicom.dataset import Dataset

from dicom_node.series.decode import PredecodedLookup, check_pixel_header, decode_volume
from dicom_node.series.headers import read_headers
from dicom_node.series.plan import Plan, plan_volume, planned_instances
from dicom_node.series.resample import plan_image
from dicom_node.settings import ReconstructionSection
from dicom_node.types import CTVolume, InstanceRecord, SeriesManifest, SourceInstance


def plan_series(
    series_uid: str, items: Sequence[tuple[InstanceRecord, Dataset]], policy: ReconstructionSection
) -> Plan:
    """Every header-only check of a series and its plan: ``Rejected`` naming the instance and the cause."""
    instances = planned_instances(series_uid, items)
    for inst in instances:
        check_pixel_header(inst.header, inst.transfer_syntax, inst.label)
    return plan_volume(series_uid, instances, policy)


def build_volume(
    study_uid: str,
    series_uid: str,
    plan: Plan,
    policy: ReconstructionSection,
    *,
    timings: dict[str, float] | None = None,
    predecoded: PredecodedLookup | None = None,
) -> CTVolume:
    """Decode and resample a planned series. ``timings`` receives seconds for ``decode`` and ``assemble`` and the
    count of ``predecoded`` instances used. A pre-decoded failure fails the series as decoding it here would."""
    t0 = time.perf_counter()
    volume, reused = decode_volume(plan, policy.decode_workers, predecoded)
    t1 = time.perf_counter()
    image = plan_image(plan, volume)
    if timings is not None:
        timings.update(decode=t1 - t0, assemble=time.perf_counter() - t1, predecoded=float(reused))
    sources = tuple(
        SourceInstance(
            sop_class_uid=f.instance.sop_class_uid,
            sop_instance_uid=f.instance.sop_instance_uid,
            path=f.instance.record.path,
            frame_number=f.header.frame_number,
            plane=f.header.plane,
            header=f.instance.header,
        )
        for f in plan.frames
    )
    return CTVolume(
        image=image,
        study_instance_uid=study_uid,
        series_instance_uid=series_uid,
        frame_of_reference_uid=plan.frame_of_reference_uid,
        sources=sources,
        resampled=tuple(plan.notes),
    )


def reconstruct_headers(
    study_uid: str,
    series_uid: str,
    items: Sequence[tuple[InstanceRecord, Dataset]],
    policy: ReconstructionSection,
    timings: dict[str, float] | None = None,
    predecoded: PredecodedLookup | None = None,
) -> CTVolume:
    """Plan and build from instances whose headers are already read (``stop_before_pixels`` datasets);
    ``timings`` also receives ``plan``."""
    t0 = time.perf_counter()
    plan = plan_series(series_uid, items, policy)
    if timings is not None:
        timings["plan"] = time.perf_counter() - t0
    return build_volume(study_uid, series_uid, plan, policy, timings=timings, predecoded=predecoded)


def reconstruct(manifest: SeriesManifest, policy: ReconstructionSection) -> CTVolume:
    """Decode and assemble one complete series. Raises ``Rejected`` naming the series/instance and the cause."""
    items = list(zip(manifest.instances, read_headers(manifest), strict=True))
    return reconstruct_headers(manifest.study_instance_uid, manifest.series_instance_uid, items, policy)


__all__ = ["build_volume", "plan_series", "reconstruct", "reconstruct_headers"]
