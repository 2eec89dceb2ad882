"""Planning a volume from headers alone: which frames, in which order, on which grid. No pixel is read here.

A series is refused here, before any decoding, when its geometry cannot make one volume: mixed orientations,
sizes or frames of reference. Frames are sorted by position along the slice normal (never by InstanceNumber);
duplicate positions, gantry tilt and missing or uneven steps are handled as ``ReconstructionSection`` says
(refuse with the reason, or keep a plan that the resampler makes regular). Each step is one function.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.uid import UID

from dicom_node.errors import Rejected
from dicom_node.series import geometry
from dicom_node.series.headers import FrameHeader, HeaderError, frame_headers, instance_uids
from dicom_node.settings import ReconstructionSection
from dicom_node.types import InstanceRecord

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class PlannedInstance:
    """One instance of the series with what planning and decoding need of its header."""

    record: InstanceRecord
    header: Dataset
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: UID
    frame_of_reference_uid: str
    acquired: tuple[str, float, int]
    """Sort key for "later-acquired": acquisition/content date-time, received time, InstanceNumber."""
    frames: tuple[FrameHeader, ...]
    label: str
    """How messages name it: series, SOP Instance UID and file name."""


@dataclass(frozen=True, slots=True)
class PlannedFrame:
    instance: PlannedInstance
    header: FrameHeader
    index: int
    """0-based frame index within its instance."""


@dataclass
class Plan:
    """The kept frames in slice order and the grid they make."""

    frames: list[PlannedFrame]
    row: FloatArray
    col: FloatArray
    normal: FloatArray
    positions: FloatArray
    """n x 3 positions of the kept frames, in slice order."""
    dx: float
    dy: float
    stack_dir: FloatArray
    """Unit direction in which slice positions step (the normal, or the table axis under gantry tilt)."""
    t: FloatArray
    """Slice positions along ``stack_dir``, ascending."""
    step: float
    """Slice step along ``stack_dir`` of the output (mean step when even, median step when resampled)."""
    regularize: bool
    """Uneven steps: interpolate onto a regular grid along ``stack_dir``."""
    tilted: bool
    notes: list[str]
    """What resampling will do, in words (recorded with the job)."""

    @property
    def rows(self) -> int:
        return self.frames[0].header.plane.rows

    @property
    def columns(self) -> int:
        return self.frames[0].header.plane.columns

    @property
    def frame_of_reference_uid(self) -> str:
        return self.frames[0].instance.frame_of_reference_uid


def instance_label(series_uid: str, sop: str, path: Path) -> str:
    return f"series {series_uid}: instance {sop} ({path.name})"


def _acquired(ds: Dataset, record: InstanceRecord) -> tuple[str, float, int]:
    stamp = str(ds.get("AcquisitionDateTime") or "")
    if not stamp:
        for date_kw, time_kw in (("AcquisitionDate", "AcquisitionTime"), ("ContentDate", "ContentTime")):
            if ds.get(date_kw) and ds.get(time_kw):
                stamp = f"{ds.get(date_kw)}{ds.get(time_kw)}"
                break
    try:
        number = int(ds.get("InstanceNumber") or 0)
    except (TypeError, ValueError):
        number = 0
    return (stamp, record.received_at, number)


def planned_instances(series_uid: str, items: Sequence[tuple[InstanceRecord, Dataset]]) -> list[PlannedInstance]:
    """Each instance's UIDs and frames (``Rejected`` naming the instance whose header lacks them)."""
    out: list[PlannedInstance] = []
    for record, ds in items:
        uids = instance_uids(
            ds,
            sop_class_uid=record.sop_class_uid,
            sop_instance_uid=record.sop_instance_uid,
            transfer_syntax_uid=record.transfer_syntax_uid,
        )
        label = instance_label(series_uid, uids.sop_instance_uid, record.path)
        ts = UID(uids.transfer_syntax_uid)
        try:
            frames = tuple(frame_headers(ds))
        except HeaderError as exc:
            raise Rejected(f"{label}: {exc}") from exc
        out.append(
            PlannedInstance(
                record=record,
                header=ds,
                sop_class_uid=uids.sop_class_uid,
                sop_instance_uid=uids.sop_instance_uid,
                transfer_syntax=ts,
                frame_of_reference_uid=uids.frame_of_reference_uid,
                acquired=_acquired(ds, record),
                frames=frames,
                label=label,
            )
        )
    return out


def check_uniform(series_uid: str, instances: Sequence[PlannedInstance], frames: Sequence[PlannedFrame]) -> None:
    """One orientation, one size and pixel spacing, one frame of reference: else the series makes no volume."""
    orientations = np.array([f.header.plane.orientation for f in frames])
    if not geometry.same_orientation(orientations):
        odd = next(f for f in frames if np.max(np.abs(np.array(f.header.plane.orientation) - orientations[0])) > 1e-3)
        raise Rejected(
            f"series {series_uid}: mixed slice orientations: {odd.instance.label} has "
            f"{list(odd.header.plane.orientation)} where {frames[0].instance.label} has "
            f"{list(frames[0].header.plane.orientation)}"
        )
    sizes = {
        (f.header.plane.rows, f.header.plane.columns, tuple(round(s, 4) for s in f.header.plane.pixel_spacing))
        for f in frames
    }
    if len(sizes) > 1:
        shown = ", ".join(f"{r}x{c} at {s[0]:g}x{s[1]:g} mm" for r, c, s in sorted(sizes)[:4])
        raise Rejected(f"series {series_uid}: mixed slice sizes or pixel spacings: {shown}")
    fors = {inst.frame_of_reference_uid for inst in instances}
    if len(fors) > 1:
        raise Rejected(f"series {series_uid}: more than one FrameOfReferenceUID: {', '.join(sorted(fors))}")


def drop_duplicates(
    series_uid: str, frames: list[PlannedFrame], along: FloatArray, policy: ReconstructionSection
) -> npt.NDArray[np.bool_]:
    """Which of the sorted frames to keep where two or more lie at one position: refuse, or keep the later one."""
    keep = np.ones(len(frames), dtype=bool)
    i = 0
    while i < len(frames):
        j = i + 1
        while j < len(frames) and along[j] - along[i] <= geometry.DUPLICATE_STEP_MM:
            j += 1
        if j - i > 1:
            group = list(range(i, j))
            names = ", ".join(frames[g].instance.sop_instance_uid for g in group)
            if policy.duplicate_positions == "reject":
                raise Rejected(
                    f"series {series_uid}: {j - i} instances at one position ({along[i]:.3f} mm along the normal): "
                    f"{names} (duplicate_positions=reject)"
                )
            latest = max(group, key=lambda g: frames[g].instance.acquired)
            for g in group:
                keep[g] = g == latest
            log.warning(
                "series %s: %d instances at %.3f mm along the normal (%s): kept the later-acquired %s",
                series_uid, j - i, along[i], names, frames[latest].instance.sop_instance_uid,
            )  # fmt: skip
        i = j
    return keep


def stacking_direction(
    series_uid: str, normal: FloatArray, positions: FloatArray, policy: ReconstructionSection, notes: list[str]
) -> tuple[FloatArray, bool]:
    """The direction slices step in, and whether that is a gantry tilt (refused, or noted for resampling)."""
    if len(positions) < 2 or not geometry.is_gantry_tilted(normal, positions):
        return normal, False
    angle = geometry.tilt_angle_deg(normal, positions)
    if policy.gantry_tilt == "reject":
        raise Rejected(
            f"series {series_uid}: gantry tilt: slice positions step {angle:.1f} deg off the slice normal "
            f"(sheared stack; gantry_tilt=reject)"
        )
    stack_dir = geometry.stack_direction(positions)
    if geometry.lateral_offsets(stack_dir, positions).max() > geometry.LATERAL_TOLERANCE_MM:
        raise Rejected(f"series {series_uid}: slice positions do not lie on one line (neither stacked nor tilted)")
    notes.append(
        f"gantry tilt {angle:.1f} deg: resampled onto a grid orthogonal to the table direction "
        f"(axial for an axial acquisition)"
    )
    return stack_dir, True


def slice_step(series_uid: str, t: FloatArray, policy: ReconstructionSection, notes: list[str]) -> tuple[float, bool]:
    """The output's slice step, and whether the stack must be made regular (missing or uneven slices)."""
    if len(t) == 1:
        return 1.0, False
    stats = geometry.spacing_stats(t, policy.spacing_tolerance)
    if stats.even:
        return float((t[-1] - t[0]) / (len(t) - 1)), False
    ratios = [stats.steps[i] / stats.median for i in stats.gaps]
    whole = bool(ratios) and all(abs(r - round(r)) <= policy.spacing_tolerance for r in ratios)
    small = [s for s in stats.steps if s < stats.median * (1 - policy.spacing_tolerance)]
    what = (
        f"{stats.missing_slices()} missing slice(s)" if whole and not small else "uneven slice steps"
    ) + f" (steps {stats.minimum:.3f}-{stats.maximum:.3f} mm, median {stats.median:.3f} mm)"
    if policy.uneven_spacing == "reject":
        raise Rejected(f"series {series_uid}: {what} (uneven_spacing=reject)")
    if stats.maximum > policy.max_gap_slices * stats.median:
        raise Rejected(
            f"series {series_uid}: {what}: a gap of {stats.maximum:.3f} mm is more than max_gap_slices="
            f"{policy.max_gap_slices:g} median steps; interpolating across it would invent anatomy"
        )
    notes.append(f"{what}: resampled onto a regular {stats.median:.3f} mm step")
    return stats.median, True


def plan_volume(series_uid: str, instances: list[PlannedInstance], policy: ReconstructionSection) -> Plan:
    """Check, sort and de-duplicate the frames of ``instances`` and decide the grid; ``Rejected`` with the reason."""
    frames = [PlannedFrame(inst, fh, k) for inst in instances for k, fh in enumerate(inst.frames)]
    if not frames:
        raise Rejected(f"series {series_uid}: no instances")
    check_uniform(series_uid, instances, frames)
    first = frames[0].header.plane
    try:
        row, col, normal = geometry.orientation_vectors(first.orientation)
    except ValueError as exc:
        raise Rejected(f"series {series_uid}: {exc}") from exc
    dy, dx = first.pixel_spacing
    if not (dx > 0 and dy > 0):
        raise Rejected(f"series {series_uid}: PixelSpacing must be positive, got {dy:g}\\{dx:g}")

    positions = np.array([f.header.plane.position for f in frames], dtype=np.float64)
    order = geometry.sort_along(normal, positions)
    frames = [frames[i] for i in order]
    positions = positions[order]
    keep = drop_duplicates(series_uid, frames, geometry.positions_along(normal, positions), policy)
    frames = [f for f, k in zip(frames, keep, strict=True) if k]
    positions = positions[keep]

    notes: list[str] = []
    stack_dir, tilted = stacking_direction(series_uid, normal, positions, policy, notes)
    t = positions @ stack_dir
    step, regularize = slice_step(series_uid, t, policy, notes)
    return Plan(frames, row, col, normal, positions, dx, dy, stack_dir, t, step, regularize, tilted, notes)


__all__ = ["Plan", "PlannedFrame", "PlannedInstance", "instance_label", "plan_volume", "planned_instances"]
