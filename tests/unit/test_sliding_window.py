"""The numpy sliding window equals MONAI's sliding_window_inference (torch only as the reference here)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
monai_inferers = pytest.importorskip("monai.inferers")
monai_utils = pytest.importorskip("monai.data.utils")

from inference.sliding_window import (  # noqa: E402
    StageTimer,
    importance_map,
    sliding_window_inference,
    window_slices,
)

ROI = (16, 12, 8)


def _net(out_channels: int = 2) -> object:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, out_channels, 3, padding=1)
    ).eval()


def _predictor(net: object):  # type: ignore[no-untyped-def]
    def run(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.from_numpy(batch)).numpy()  # type: ignore[operator]

    return run


def _reference(image: np.ndarray, net: object, **kw: object) -> np.ndarray:
    with torch.no_grad():
        out = monai_inferers.sliding_window_inference(torch.from_numpy(image)[None], predictor=net, **kw)
    return out.numpy()[0]


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
@pytest.mark.parametrize("batch_size", [1, 3])
@pytest.mark.parametrize(
    "shape",
    [
        (16, 12, 8),  # equal to the ROI
        (9, 5, 3),  # smaller in every axis: padded
        (41, 30, 21),  # larger in every axis
        (40, 7, 20),  # smaller in one axis, larger in the others
        (10, 29, 8),
        (17, 12, 5),
    ],
)
def test_equals_monai(shape: tuple[int, int, int], mode: str, batch_size: int) -> None:
    net = _net()
    image = np.random.default_rng(1).random((1, *shape), dtype=np.float32)
    kw = {"overlap": 0.25, "mode": mode, "sigma_scale": 0.125}
    ref = _reference(image, net, roi_size=ROI, sw_batch_size=batch_size, cval=0.2, **kw)
    out = sliding_window_inference(
        image,
        ROI,
        _predictor(net),
        batch_size=batch_size,
        padding_value=0.2,
        **kw,  # type: ignore[arg-type]
    )
    assert out.shape == ref.shape and out.dtype == np.float32
    assert _rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("overlap", [0.0, 0.5, 0.7])
def test_other_overlaps_and_in_flight(overlap: float) -> None:
    net = _net()
    image = np.random.default_rng(2).random((1, 30, 20, 12), dtype=np.float32)
    ref = _reference(image, net, roi_size=ROI, sw_batch_size=2, overlap=overlap, mode="gaussian")
    out = sliding_window_inference(
        image, ROI, _predictor(net), overlap=overlap, mode="gaussian", batch_size=2, max_in_flight=3
    )
    assert _rel_err(out, ref) <= 1e-5


def test_importance_map_and_windows_equal_monai() -> None:
    for roi in [(224, 224, 32), (16, 12, 8), (5, 1, 3)]:
        for mode in ("gaussian", "constant"):
            ref = monai_utils.compute_importance_map(roi, mode=mode, sigma_scale=0.125).numpy()
            np.testing.assert_allclose(importance_map(roi, mode, 0.125), ref, rtol=1e-6, atol=0)
    from monai.inferers.utils import _get_scan_interval

    for size, roi in [((365, 365, 48), (224, 224, 32)), ((300, 224, 300), (224, 224, 32)), ((40, 12, 9), ROI)]:
        interval = _get_scan_interval(size, roi, 3, (0.25,) * 3)
        assert window_slices(size, roi, 0.25) == monai_utils.dense_patch_slices(size, roi, interval)


def test_window_transform_and_unnormalised_argmax_agree() -> None:
    """Blending l1 - l0 unnormalised gives the argmax of the blended, normalised two-channel logits."""
    net = _net()
    image = np.random.default_rng(3).random((1, 33, 20, 13), dtype=np.float32)
    full = sliding_window_inference(image, ROI, _predictor(net), mode="gaussian", batch_size=2)
    diff = sliding_window_inference(
        image,
        ROI,
        _predictor(net),
        mode="gaussian",
        batch_size=2,
        normalize=False,
        window_transform=lambda o: o[:, 1:2] - o[:, 0:1],
    )
    assert diff.shape == (1, 33, 20, 13)
    assert np.array_equal(np.argmax(full, axis=0), (diff[0] > 0).astype(np.int64))


def test_in_flight_requests_overlap_and_are_timed_once() -> None:
    import threading
    import time

    active, peak, lock = [0], [0], threading.Lock()

    def slow(batch: np.ndarray) -> np.ndarray:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        t0 = time.perf_counter()
        time.sleep(0.05)
        timer.add_interval("model_compute", t0, time.perf_counter())
        with lock:
            active[0] -= 1
        return np.repeat(batch, 2, axis=1)

    timer = StageTimer()
    image = np.random.default_rng(4).random((1, 64, 12, 8), dtype=np.float32)
    t0 = time.perf_counter()
    out = sliding_window_inference(image, ROI, slow, overlap=0.0, batch_size=1, max_in_flight=4, timer=timer)
    wall = time.perf_counter() - t0
    assert peak[0] == 4
    np.testing.assert_allclose(out, np.repeat(image, 2, axis=0), rtol=1e-6)
    assert timer.as_dict()["model_compute"] <= wall


def test_real_roi_with_segresnet() -> None:
    """One case at the real ROI (224 x 224 x 32) on the real architecture: larger than the ROI in x, smaller
    in y (padded), equal in z."""
    from tests.model_export import build_segresnet

    net = build_segresnet()
    roi = (224, 224, 32)
    image = np.random.default_rng(5).random((1, 250, 200, 32), dtype=np.float32)
    ref = _reference(image, net, roi_size=roi, sw_batch_size=2, overlap=0.25, mode="gaussian", sigma_scale=0.125)
    out = sliding_window_inference(image, roi, _predictor(net), overlap=0.25, mode="gaussian", batch_size=2)
    assert _rel_err(out, ref) <= 1e-5


def test_window_axes_hand_the_model_its_own_layout() -> None:
    """A (z, y, x) array run on an x, y, z model through window_axes equals MONAI on the transposed array."""
    net = _net()
    zyx = np.random.default_rng(6).random((1, 11, 26, 37), dtype=np.float32)
    xyz = np.ascontiguousarray(zyx.transpose(0, 3, 2, 1))
    ref = _reference(xyz, net, roi_size=ROI, sw_batch_size=2, overlap=0.25, mode="gaussian").transpose(0, 3, 2, 1)
    seen: list[tuple[int, ...]] = []

    def run(batch: np.ndarray) -> np.ndarray:
        seen.append(batch.shape[2:])
        return _predictor(net)(batch)

    out = sliding_window_inference(zyx, ROI[::-1], run, mode="gaussian", batch_size=2, window_axes=(2, 1, 0))
    assert set(seen) == {ROI}
    assert _rel_err(out, ref) <= 1e-5
