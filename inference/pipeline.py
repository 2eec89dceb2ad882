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
from inference.lung_fields import block_air, blocks_lung_fields, clear_outside
from inference.sliding_window import FloatArray, StageTimer, sliding_window_inference
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
    if lung_spec is not None:  # thresholded blocks now (1 byte a block); the rest after inference
        with timer.stage("lung_fields"):
            lung_air = block_air(resampled, lung_spec)
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
    if lung_air is not None and lung_spec is not None:
        # After the sliding window: the connected components and hole filling then reuse memory the inference
        # has given back instead of adding to its peak.
        with timer.stage("lung_fields"):
            clear_outside(labels, blocks_lung_fields(lung_air[0], lung_spec), lung_air[1])
        del lung_air
    with timer.stage("labels"):
        label_image = label_image_on_grid(np.ascontiguousarray(labels, dtype=np.uint8), grid)
        del labels
    with timer.stage("restore"):
        restored = restore_labels(label_image, image)
    timings = timer.as_dict()
    ordered = {stage: timings.get(stage, 0.0) for stage in STAGES}
    windows = _count_windows(model_size, spec)
    return SegmentationResult(label=restored, timings=ordered, model_grid_size=model_size, windows=windows)  # type: ignore[arg-type]


def _count_windows(size_xyz: tuple[int, ...], spec: InferenceSpec) -> int:
    from inference.sliding_window import scan_interval, window_starts

    padded = [max(n, r) for n, r in zip(size_xyz, spec.inferer.roi_size, strict=True)]
    starts = window_starts(
        padded, spec.inferer.roi_size, scan_interval(padded, spec.inferer.roi_size, spec.inferer.overlap)
    )
    return math.prod(len(s) for s in starts)
