"""Volume in, label volume out: resample -> normalise -> sliding window on a Backend -> labels -> restore.

Axis orders: SimpleITK images are indexed (x, y, z) and their numpy arrays are (z, y, x); the spec's spatial
triples are (x, y, z). The sliding window runs on the (z, y, x) array with the ROI reversed; each batch of windows
is transposed to the model's layout (NCXYZ or NCZYX) just before the backend and back just after, so the volume
is never transposed as a whole.

Labels: with softmax over K channels the label is the argmax of the blended logits (softmax is monotone and the
blending weights are positive, so neither the softmax nor the division by the sum of weights changes it); with
two channels only the difference of the two logits is blended (label where it is > 0, ties to background as
argmax does), which halves the blending work and memory. With sigmoid the blended logit is compared with
logit(threshold). Channel k >= 1 gets the label of the spec's k-th segment; background is 0. With
``post_transforms.lung_fields`` labels outside the lung fields (``inference.lung_fields``) are set to background.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from inference.backend import Backend
from inference.errors import ModelMismatch, SpecError
from inference.lung_fields import (
    BoolArray,
    block_air,
    blocks_image,
    blocks_lung_core,
    clear_outside,
    grow_blocks,
)
from inference.sliding_window import (
    FloatArray,
    StageTimer,
    WindowFilter,
    scan_interval,
    sliding_window_inference,
    window_slices,
    window_starts,
)
from inference.spec import InferenceSpec
from inference.transforms import label_image_on_grid, normalise_intensity, resample_to_spacing, restore_labels

STAGES = ("resample", "normalise", "lung_fields", "tiling", "model_compute", "blending", "labels", "restore")


@dataclass
class SegmentationResult:
    """The label image on exactly the input grid (uint8), and where the time went."""

    label: sitk.Image
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per stage (see STAGES); ``model_compute`` is the time at least one backend call was running."""
    model_grid_size: tuple[int, int, int] = (0, 0, 0)
    """(x, y, z) size of the resampled volume the network saw."""
    windows: int = 0
    """Windows of ROI size that tile the whole model grid (``windows_total`` of the job's result)."""
    windows_run: int = 0
    """Windows the backend actually ran: fewer than ``windows`` with ``inferer.windows: lung_fields``."""
    lung_mask: sitk.Image | None = None
    """The lungs (uint8, 1 = lung: the lung fields before their margin, see ``inference.lung_fields``) on that
    step's grid of in-plane blocks, in the input's patient space; None when the spec has no ``lung_fields``.
    What the burden numbers (``inference.burden``) measure as the lungs."""


_XYZ_FROM_ZYX = (2, 1, 0)
"""Spatial transpose between (z, y, x) and (x, y, z); it is its own inverse."""


def _channel_labels(spec: InferenceSpec) -> npt.NDArray[np.uint8]:
    """Label value per output channel (channel 0 = background for softmax)."""
    labels = [s.label for s in spec.segments]
    if any(not 0 < v < 256 for v in labels):
        raise SpecError(f"{spec.source or 'config_inference'}.segments: labels must be in 1..255, got {labels}")
    if spec.post.activation == "softmax":
        if len(labels) != spec.model.output_channels - 1:
            raise SpecError(
                f"{spec.source or 'config_inference'}: {spec.model.output_channels} softmax channels need "
                f"{spec.model.output_channels - 1} segments, got {len(labels)}"
            )
        return np.asarray([0, *labels], dtype=np.uint8)
    return np.asarray([0, labels[0]], dtype=np.uint8)


def segment(
    image: sitk.Image, spec: InferenceSpec, backend: Backend, *, max_in_flight: int | None = None
) -> SegmentationResult:
    """Segment a 3-D scalar image; the returned label image has exactly ``image``'s grid.

    ``max_in_flight`` defaults to the backend's ``max_in_flight`` attribute (1 when it has none).
    """
    timer = StageTimer()
    channel_labels = _channel_labels(spec)
    in_flight = max_in_flight if max_in_flight is not None else int(getattr(backend, "max_in_flight", 1) or 1)

    with timer.stage("resample"):
        resampled = resample_to_spacing(image, spec.pre.spacing_mm, spec.pre.interpolation)
        grid = sitk.Image(1, 1, 1, sitk.sitkUInt8)
        grid.SetSpacing(resampled.GetSpacing())
        grid.SetOrigin(resampled.GetOrigin())
        grid.SetDirection(resampled.GetDirection())
        model_size = tuple(resampled.GetSize())
    with timer.stage("normalise"):
        view = sitk.GetArrayViewFromImage(resampled)
        volume = np.empty(view.shape, dtype=np.float32)
        if spec.pre.intensity.clip:
            np.clip(view, spec.pre.intensity.a_min, spec.pre.intensity.a_max, out=volume)
            volume = normalise_intensity(volume, spec.pre.intensity)
        else:
            volume[...] = view
            volume = normalise_intensity(volume, spec.pre.intensity)
        del view
    lung_spec = spec.post.lung_fields
    lung_air = None
    core: BoolArray | None = None
    fields: BoolArray | None = None
    if lung_spec is not None:  # thresholded blocks now (1 byte a block); the rest after inference unless needed
        with timer.stage("lung_fields"):
            lung_air = block_air(resampled, lung_spec)
            if spec.inferer.windows == "lung_fields":  # the windows go only where the lung fields are
                core = blocks_lung_core(lung_air[0], lung_spec)
                fields = grow_blocks(core, lung_air[0].GetSpacing(), lung_spec)
    del resampled

    in_layout, out_layout = spec.model.input.layout, spec.model.output.layout
    expected_channels = spec.model.output_channels

    def predictor(windows: FloatArray) -> FloatArray:
        # windows arrive in the input layout (gathered that way); outputs go back in the input layout too.
        t1 = time.perf_counter()
        out = backend.infer(windows)
        t2 = time.perf_counter()
        timer.add_interval("model_compute", t1, t2)
        if out.ndim == 5 and out.shape[1] != expected_channels:
            raise ModelMismatch(
                f"model {spec.model.name}: output has {out.shape[1]} channels, the spec says {expected_channels}"
            )
        if out_layout != in_layout and out.ndim == 5:
            out = out.transpose(0, 1, 4, 3, 2)
        return out

    def logit_difference(out: FloatArray) -> FloatArray:
        # (N, 2, ...) -> (N, 1, ...): channel 1 minus channel 0, written over channel 1 (no new buffer).
        if not out.flags.writeable:
            out = np.array(out)
        np.subtract(out[:, 1:2], out[:, 0:1], out=out[:, 1:2])
        return out[:, 1:2]

    softmax2 = spec.post.activation == "softmax" and expected_channels == 2
    sigmoid = spec.post.activation == "sigmoid"
    roi_zyx = tuple(reversed(spec.inferer.roi_size))
    keep: WindowFilter | None = None
    windows_total = _count_windows(model_size, spec)
    windows_run = windows_total
    if fields is not None and lung_air is not None:
        bounds = lung_bounds(fields, lung_air[1], volume.shape)
        if bounds is None:  # no lung fields at all: every label would be cleared, so no window is worth running
            return _no_lungs(image, grid, timer, model_size, spec, core, lung_air[0])
        over_lungs = lattice_filter(fields, lung_air[1], bounds, volume.shape, roi_zyx, spec.inferer.overlap)
        kept = sum(over_lungs(w) for w in lattice_windows(volume.shape, roi_zyx, spec.inferer.overlap))
        if kept < windows_total:  # else every window is needed: the whole grid, the same labels exactly
            keep, windows_run = over_lungs, kept
    blended = sliding_window_inference(
        volume[None],
        roi_zyx,
        predictor,
        overlap=spec.inferer.overlap,
        mode=spec.inferer.mode,
        sigma_scale=spec.inferer.sigma_scale,
        batch_size=spec.inferer.batch_size,
        padding_value=spec.inferer.padding_value,
        max_in_flight=in_flight,
        window_transform=logit_difference if softmax2 else None,
        normalize=sigmoid,
        window_axes=_XYZ_FROM_ZYX if in_layout == "NCXYZ" else None,
        timer=timer,
        keep=keep,
    )
    del volume

    with timer.stage("labels"):
        if softmax2:
            labels = np.greater(blended[0], 0.0).view(np.uint8)
            if channel_labels[1] != 1:
                labels = channel_labels[labels]
        elif sigmoid:
            t = spec.post.threshold
            if 0.0 < t < 1.0:
                mask = blended[0] >= np.float32(math.log(t / (1.0 - t)))
            else:
                mask = (1.0 / (1.0 + np.exp(-blended[0].astype(np.float64)))) >= t
            labels = mask.view(np.uint8) if channel_labels[1] == 1 else channel_labels[mask.view(np.uint8)]
        else:
            labels = channel_labels[np.argmax(blended, axis=0)]
        del blended
    lung_mask = None
    if lung_air is not None and lung_spec is not None:
        # After the sliding window (unless the windows needed them): the connected components and hole filling
        # then reuse memory the inference has given back instead of adding to its peak.
        with timer.stage("lung_fields"):
            if core is None or fields is None:
                core = blocks_lung_core(lung_air[0], lung_spec)
                fields = grow_blocks(core, lung_air[0].GetSpacing(), lung_spec)
            clear_outside(labels, fields, lung_air[1])
            lung_mask = blocks_image(core, lung_air[0])
        del lung_air
    with timer.stage("labels"):
        label_image = label_image_on_grid(np.ascontiguousarray(labels, dtype=np.uint8), grid)
        del labels
    with timer.stage("restore"):
        restored = restore_labels(label_image, image)
    timings = timer.as_dict()
    ordered = {stage: timings.get(stage, 0.0) for stage in STAGES}
    return SegmentationResult(
        label=restored,
        timings=ordered,
        model_grid_size=model_size,  # type: ignore[arg-type]
        windows=windows_total,
        windows_run=windows_run,
        lung_mask=lung_mask,
    )


def lung_bounds(fields: BoolArray, block_yx: tuple[int, int], shape_zyx: tuple[int, ...]) -> tuple[slice, ...] | None:
    """The (z, y, x) box of the model grid that holds the lung fields (blocks of ``block_yx`` voxels in-plane);
    None when the lung fields are empty."""
    if not fields.any():
        return None
    by, bx = block_yx
    box = []
    for axis, scale in ((0, 1), (1, by), (2, bx)):
        occupied = np.flatnonzero(fields.any(axis=tuple(a for a in range(3) if a != axis)))
        lo, hi = int(occupied[0]) * scale, min(shape_zyx[axis], (int(occupied[-1]) + 1) * scale)
        box.append(slice(lo, hi))
    return tuple(box)


def lattice_windows(shape: tuple[int, ...], roi: tuple[int, ...], overlap: float) -> list[tuple[slice, ...]]:
    """The whole grid's windows as ``sliding_window_inference`` hands them to its ``keep`` filter: in the
    unpadded volume's coordinates, clipped to it where the volume is smaller than the ROI (and padded)."""
    padded = [max(n, r) for n, r in zip(shape, roi, strict=True)]
    offsets = [(p - n) // 2 for p, n in zip(padded, shape, strict=True)]
    return [
        tuple(slice(max(0, w.start - o), min(n, w.stop - o)) for w, o, n in zip(window, offsets, shape, strict=True))
        for window in window_slices(padded, roi, overlap)
    ]


def lattice_cover(
    bounds: tuple[slice, ...], shape: tuple[int, ...], roi: tuple[int, ...], overlap: float
) -> list[frozenset[int]]:
    """Per axis, the starts (as ``lattice_windows`` gives them) of the whole grid's windows that cover ``bounds``:
    in the lattice's order, from the last window that starts at or before the bounds to the first that reaches
    their end.

    Only the whole grid's own windows, never windows laid anew over the bounds: the network (stride 8) is not
    shift-invariant, so a window shifted by a few voxels predicts differently, and on a clean scan, where every
    positive is a false positive at the decision boundary, those differences flip labels (measured, issue 20:
    Dice 0.62-0.97 against the whole grid for windows laid over the lung box, 0.97-1.0 for this subset). Each
    window run here gets the same input as one of the whole grid's; what differs is only the blend where a skipped
    window (typically the last, clamped against the border a few voxels from its neighbour) also had weight.
    """
    chosen: list[frozenset[int]] = []
    for box, n, r in zip(bounds, shape, roi, strict=True):
        if n <= r:  # one window, padded, at 0
            chosen.append(frozenset({0}))
            continue
        starts = window_starts([n], [r], scan_interval([n], [r], overlap))[0]
        first = max(s for s in starts if s <= box.start)
        axis: list[int] = []
        for s in starts:
            if s < first:
                continue
            axis.append(s)
            if s + r >= box.stop:
                break
        chosen.append(frozenset(axis))
    return chosen


def lattice_filter(
    fields: BoolArray,
    block_yx: tuple[int, int],
    bounds: tuple[slice, ...],
    shape: tuple[int, ...],
    roi: tuple[int, ...],
    overlap: float,
) -> WindowFilter:
    """Keep a window of the whole grid when it is one of ``lattice_cover``'s and a lung-field block lies under it."""
    by, bx = block_yx
    cover = lattice_cover(bounds, shape, roi, overlap)

    def keep(window: tuple[slice, ...]) -> bool:
        if any(s.start not in starts for s, starts in zip(window, cover, strict=True)):
            return False
        zs, ys, xs = window
        under = fields[zs, ys.start // by : (ys.stop - 1) // by + 1, xs.start // bx : (xs.stop - 1) // bx + 1]
        return bool(under.any())

    return keep


def _no_lungs(
    image: sitk.Image,
    grid: sitk.Image,
    timer: StageTimer,
    model_size: tuple[int, ...],
    spec: InferenceSpec,
    core: BoolArray | None,
    blocks: sitk.Image,
) -> SegmentationResult:
    """The result when the lung fields are empty: no window runs and every label is background."""
    with timer.stage("restore"):
        empty = sitk.Image(image.GetSize(), sitk.sitkUInt8)
        empty.CopyInformation(image)
    timings = timer.as_dict()
    lung_mask = blocks_image(core, blocks) if core is not None else None
    return SegmentationResult(
        label=empty,
        timings={stage: timings.get(stage, 0.0) for stage in STAGES},
        model_grid_size=model_size,  # type: ignore[arg-type]
        windows=_count_windows(model_size, spec),
        windows_run=0,
        lung_mask=lung_mask,
    )


def _count_windows(size_xyz: tuple[int, ...], spec: InferenceSpec) -> int:
    padded = [max(n, r) for n, r in zip(size_xyz, spec.inferer.roi_size, strict=True)]
    starts = window_starts(
        padded, spec.inferer.roi_size, scan_interval(padded, spec.inferer.roi_size, spec.inferer.overlap)
    )
    return math.prod(len(s) for s in starts)
