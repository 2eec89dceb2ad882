"""Sliding-window inference in numpy, equal to MONAI's ``monai.inferers.sliding_window_inference``.

Same scan interval (``int(roi * (1 - overlap))``, the ROI itself where the image equals it), same window start
positions (the last window pulled back to end at the border), same importance map (``compute_importance_map``:
a separable gaussian with sigma = sigma_scale * roi, clamped below at max(min, 1e-3); or ones), same padding
(``padding_value``, split ``diff // 2`` before and the rest after, where the image is smaller than the ROI) and
the same blending: sum of ``output * weight`` divided by the sum of weights. The raw network outputs (logits) are
blended; activations come afterwards.

Memory: one float32 accumulator of the output channels (or of what ``window_transform`` reduces them to), plus
the count map only when ``normalize`` is asked for; windows are gathered batch by batch. Several batches can be
in flight at once (``max_in_flight``) for servers that run requests concurrently; results are blended in
submission order, so the result does not depend on the scheduling.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import numpy.typing as npt

from inference.errors import ModelMismatch

FloatArray = npt.NDArray[np.float32]
Predictor = Callable[[FloatArray], FloatArray]
"""(N, C, *roi) float32 -> (N, K, *roi) float32: the raw network on one batch of windows."""
WindowFilter = Callable[[tuple[slice, ...]], bool]
"""Whether to run one window (its slices in the unpadded image)."""
WindowTransform = Callable[[FloatArray], FloatArray]
"""Applied to each batch of raw outputs before blending; must be linear per voxel for the result to equal
blending first and transforming after (e.g. the difference of two logit channels)."""


class StageTimer:
    """Wall-clock seconds per named stage, thread safe. Model compute is kept as busy intervals so concurrent
    requests are counted once (the time during which at least one request was running)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seconds: dict[str, float] = {}
        self._intervals: dict[str, list[tuple[float, float]]] = {}

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def add_interval(self, stage: str, start: float, end: float) -> None:
        with self._lock:
            self._intervals.setdefault(stage, []).append((start, end))

    def stage(self, name: str) -> _Stage:
        return _Stage(self, name)

    def as_dict(self) -> dict[str, float]:
        with self._lock:
            out = dict(self.seconds)
            for stage, intervals in self._intervals.items():
                total, end = 0.0, -math.inf
                for a, b in sorted(intervals):
                    if a > end:
                        total += b - a
                        end = b
                    elif b > end:
                        total += b - end
                        end = b
                out[stage] = out.get(stage, 0.0) + total
            return out


class _Stage:
    def __init__(self, timer: StageTimer, name: str) -> None:
        self._timer, self._name, self._t0 = timer, name, 0.0

    def __enter__(self) -> None:
        self._t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self._timer.add(self._name, time.perf_counter() - self._t0)


def scan_interval(image_size: Sequence[int], roi_size: Sequence[int], overlap: float) -> tuple[int, ...]:
    """MONAI's ``_get_scan_interval``."""
    out = []
    for n, r in zip(image_size, roi_size, strict=True):
        if r == n:
            out.append(int(r))
        else:
            interval = int(r * (1 - overlap))
            out.append(interval if interval > 0 else 1)
    return tuple(out)


def window_starts(image_size: Sequence[int], roi_size: Sequence[int], interval: Sequence[int]) -> list[list[int]]:
    """Start index of every window along each axis (MONAI's ``dense_patch_slices``); roi <= image per axis."""
    starts = []
    for n, r, step in zip(image_size, roi_size, interval, strict=True):
        count = 1
        if step > 0:
            num = math.ceil(float(n) / step)
            found = next((d for d in range(num) if d * step + r >= n), None)
            count = found + 1 if found is not None else 1
        starts.append([k * step - max(k * step + r - n, 0) for k in range(count)])
    return starts


def window_slices(image_size: Sequence[int], roi_size: Sequence[int], overlap: float) -> list[tuple[slice, ...]]:
    """Every window of ``roi_size`` over ``image_size`` (roi <= image), in MONAI's order (last axis fastest)."""
    starts = window_starts(image_size, roi_size, scan_interval(image_size, roi_size, overlap))
    grids = np.meshgrid(*[np.asarray(s) for s in starts], indexing="ij")
    corners = np.stack([g.ravel() for g in grids], axis=1)
    return [tuple(slice(int(s), int(s) + r) for s, r in zip(c, roi_size, strict=True)) for c in corners]


def importance_map(roi_size: Sequence[int], mode: str, sigma_scale: float | Sequence[float]) -> FloatArray:
    """MONAI's ``compute_importance_map`` in float32."""
    if mode == "constant":
        weights = np.ones(tuple(roi_size), dtype=np.float32)
    elif mode == "gaussian":
        scales = [float(sigma_scale)] * len(roi_size) if np.isscalar(sigma_scale) else list(sigma_scale)  # type: ignore[arg-type]
        weights = np.ones((), dtype=np.float32)
        for n, scale in zip(roi_size, scales, strict=True):
            sigma = n * scale
            x = np.arange(-(n - 1) / 2.0, (n - 1) / 2.0 + 1, dtype=np.float32)
            g = np.exp(x**2 / np.float32(-2 * sigma**2)).astype(np.float32)
            weights = weights[..., None] * g
    else:
        raise ValueError(f"unsupported blending mode {mode!r} (constant or gaussian)")
    floor = max(float(weights.min()), 1e-3)
    return np.maximum(weights, np.float32(floor)).astype(np.float32, copy=False)


def _pad(image: FloatArray, roi_size: Sequence[int], value: float) -> tuple[FloatArray, tuple[slice, ...] | None]:
    spatial = image.shape[1:]
    diffs = [max(r - n, 0) for n, r in zip(spatial, roi_size, strict=True)]
    if not any(diffs):
        return image, None
    padded_shape = tuple(n + d for n, d in zip(spatial, diffs, strict=True))
    padded = np.full((image.shape[0], *padded_shape), value, dtype=np.float32)
    inner = tuple(slice(d // 2, d // 2 + n) for d, n in zip(diffs, spatial, strict=True))
    padded[(slice(None), *inner)] = image
    return padded, inner


def sliding_window_inference(
    image: FloatArray,
    roi_size: Sequence[int],
    predictor: Predictor,
    *,
    overlap: float = 0.25,
    mode: str = "constant",
    sigma_scale: float | Sequence[float] = 0.125,
    batch_size: int = 1,
    padding_value: float = 0.0,
    max_in_flight: int = 1,
    window_transform: WindowTransform | None = None,
    normalize: bool = True,
    window_axes: Sequence[int] | None = None,
    timer: StageTimer | None = None,
    keep: WindowFilter | None = None,
) -> FloatArray:
    """Blend ``predictor`` over windows of ``image`` (C, *spatial) float32; returns (K, *spatial) float32.

    ``roi_size`` is in the array's axis order. With ``normalize=False`` the weighted sum is returned without the
    division by the sum of weights: the weights are positive, so argmax over channels and the sign of a channel
    are the same, and a full pass over the volume (and the count map's memory) is saved.

    ``window_axes`` permutes the spatial axes of each window as it is gathered (numpy ``transpose`` order, e.g.
    ``(2, 1, 0)`` to hand (z, y, x) data to an x, y, z model) without a separate copy; the predictor's outputs are
    then expected in that order too; they are accumulated in that order and the result is returned as a permuted
    view (not C-contiguous) in the image's axis order.

    ``keep``, when given, is asked for every window (its slices in the unpadded image's coordinates) and only
    the windows it keeps are run; a voxel no kept window covers is 0 in the result. At least one window must be
    kept.

    Stages timed into ``timer``: ``tiling`` (gathering windows), ``blending`` (weighting, accumulating and the
    final division). The predictor times itself.
    """
    if image.ndim != len(roi_size) + 1:
        raise ValueError(f"image must be (C, *spatial) with {len(roi_size)} spatial axes, got shape {image.shape}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if batch_size < 1 or max_in_flight < 1:
        raise ValueError("batch_size and max_in_flight must be >= 1")
    roi = tuple(int(r) for r in roi_size)
    timer = timer or StageTimer()
    original_spatial = image.shape[1:]
    padded, inner = _pad(image, roi, padding_value)
    spatial = padded.shape[1:]
    slices = window_slices(spatial, roi, overlap)
    if keep is not None:
        offsets = [0] * len(roi) if inner is None else [s.start for s in inner]
        slices = [
            w
            for w in slices
            if keep(tuple(
                slice(max(0, s.start - o), min(n, s.stop - o))
                for s, o, n in zip(w, offsets, original_spatial, strict=True)
            ))
        ]  # fmt: skip
        if not slices:
            raise ValueError("keep: no window kept")
    weights = importance_map(roi, mode, sigma_scale)
    batches = [slices[i : i + batch_size] for i in range(0, len(slices), batch_size)]
    accumulator: FloatArray | None = None

    axes = tuple(int(a) for a in window_axes) if window_axes is not None else tuple(range(len(roi)))
    if sorted(axes) != list(range(len(roi))):
        raise ValueError(f"window_axes must be a permutation of the spatial axes, got {window_axes}")
    gather_axes = (0, *(a + 1 for a in axes))
    permuted_roi = tuple(roi[a] for a in axes)
    inverse = (0, *(axes.index(k) + 1 for k in range(len(roi))))

    def gather(batch: list[tuple[slice, ...]]) -> FloatArray:
        with timer.stage("tiling"):
            windows = np.empty((len(batch), padded.shape[0], *permuted_roi), dtype=np.float32)
            for k, window in enumerate(batch):
                windows[k] = padded[(slice(None), *window)].transpose(gather_axes)
            return windows

    permuted_weights = np.ascontiguousarray(weights.transpose(axes))

    permuted_spatial = tuple(spatial[a] for a in axes)

    def blend(batch: list[tuple[slice, ...]], output: FloatArray) -> None:
        # The accumulator is kept in the predictor's axis order, so weighting and accumulating run over contiguous
        # windows; the result is permuted back as a view at the end.
        nonlocal accumulator
        expected = (len(batch), *permuted_roi)
        if output.ndim != len(roi) + 2 or (output.shape[0], *output.shape[2:]) != expected:
            raise ModelMismatch(
                f"model output shape {tuple(output.shape)} does not match the windows sent "
                f"({len(batch)} windows of {' x '.join(map(str, permuted_roi))})"
            )
        with timer.stage("blending"):
            if output.dtype != np.float32 or not output.flags.writeable:
                output = np.array(output, dtype=np.float32)
            if window_transform is not None:
                output = window_transform(output)
            if accumulator is None:
                accumulator = np.zeros((output.shape[1], *permuted_spatial), dtype=np.float32)
            np.multiply(output, permuted_weights, out=output)
            for k, window in enumerate(batch):
                accumulator[(slice(None), *(window[a] for a in axes))] += output[k]

    if max_in_flight == 1 or len(batches) == 1:
        for batch in batches:
            blend(batch, predictor(gather(batch)))
    else:
        with ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="sliding-window") as pool:
            pending: deque[tuple[list[tuple[slice, ...]], Future[FloatArray]]] = deque()
            try:
                for batch in batches:
                    pending.append((batch, pool.submit(predictor, gather(batch))))
                    if len(pending) >= max_in_flight:
                        done_batch, future = pending.popleft()
                        blend(done_batch, future.result())
                while pending:
                    done_batch, future = pending.popleft()
                    blend(done_batch, future.result())
            finally:
                for _, future in pending:
                    future.cancel()
    assert accumulator is not None
    with timer.stage("blending"):
        if normalize:
            count = np.zeros(permuted_spatial, dtype=np.float32)
            for window in slices:
                count[tuple(window[a] for a in axes)] += permuted_weights
            if keep is None:
                np.divide(accumulator, count, out=accumulator)
            else:  # voxels no kept window covers stay 0
                np.divide(accumulator, count, out=accumulator, where=count > 0)
            del count
        result: FloatArray = accumulator.transpose(inverse)  # a view, (K, *spatial)
        if inner is not None:
            result = np.ascontiguousarray(result[(slice(None), *inner)])
    assert result.shape[1:] == original_spatial
    return result
