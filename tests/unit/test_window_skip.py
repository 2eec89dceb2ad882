"""Windows only where the lungs are, and the Triton fleet's balancing and failover, without a model server."""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import SimpleITK as sitk

from inference.errors import BackendUnavailable, ModelMismatch
from inference.pipeline import lattice_cover, lattice_windows, lung_bounds, segment
from inference.sliding_window import sliding_window_inference, window_slices
from inference.spec import InferenceSpec, parse_spec
from inference.triton_fleet import TritonFleet

REPO = Path(__file__).resolve().parents[2]


def _spec(**inferer: Any) -> InferenceSpec:
    data = json.loads((REPO / "config" / "config_inference.json").read_text())
    data["inferer"].update({"roi_size": [48, 48, 8], "batch_size": 2, **inferer})
    return parse_spec(data)


class ThresholdBackend:
    """Logits [0, x - 0.5]: label 1 where the normalised intensity is above 0.5 (HU above -250)."""

    name = "threshold"

    def __init__(self) -> None:
        self.windows = 0

    def check(self) -> None: ...

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self.windows += batch.shape[0]
        return np.concatenate([np.zeros_like(batch), batch - 0.5], axis=1)

    def close(self) -> None: ...


def _chest(lesion: bool = True) -> sitk.Image:
    """Air, a body of soft tissue, two lungs (-850 HU) in its upper half, a dense lesion in the right lung, and
    a long abdomen below them: a grid where most windows miss the lungs."""
    z, y, x = np.meshgrid(np.arange(40), np.arange(96), np.arange(96), indexing="ij")
    hu = np.full(z.shape, -1000.0, dtype=np.float32)
    body = ((x - 48) / 44.0) ** 2 + ((y - 48) / 36.0) ** 2 <= 1
    hu[body] = 40.0
    for cx in (30, 66):
        lung = (((x - cx) / 14.0) ** 2 + ((y - 46) / 22.0) ** 2 <= 1) & (z < 14)
        hu[lung] = -850.0
    if lesion:
        hu[(((x - 30) / 5.0) ** 2 + ((y - 46) / 5.0) ** 2 <= 1) & (z >= 4) & (z < 10)] = -150.0
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((1.6, 1.6, 5.0))
    image.SetOrigin((-76.0, -76.0, -100.0))
    return image


def test_sliding_window_runs_only_the_windows_kept() -> None:
    image = np.random.default_rng(0).random((1, 20, 30, 30), dtype=np.float32)
    calls: list[int] = []

    def predictor(windows: np.ndarray) -> np.ndarray:
        calls.append(windows.shape[0])
        return windows.copy()

    every = window_slices((20, 30, 30), (8, 12, 12), 0.25)
    kept = [w for w in every if w[0].start < 8]
    out = sliding_window_inference(
        image, (8, 12, 12), predictor, overlap=0.25, keep=lambda w: w[0].start < 8, normalize=True
    )
    assert sum(calls) == len(kept) < len(every)
    # Covered voxels are the image (identity model, normalised); voxels no kept window covers are 0.
    np.testing.assert_allclose(out[:, :8], image[:, :8], rtol=1e-5)
    assert not out[:, 16:].any()
    with pytest.raises(ValueError, match="no window kept"):
        sliding_window_inference(image, (8, 12, 12), predictor, keep=lambda w: False)


def test_lung_bounds_hold_the_lung_field_blocks() -> None:
    fields = np.zeros((10, 20, 20), dtype=bool)
    fields[2:4, 5:7, 8:9] = True
    box = lung_bounds(fields, (2, 2), (10, 40, 40))
    assert box is not None
    assert [(s.start, s.stop) for s in box] == [(2, 4), (10, 14), (16, 18)]
    assert lung_bounds(np.zeros_like(fields), (2, 2), (10, 40, 40)) is None


def test_the_cover_is_a_run_of_the_whole_grids_own_windows() -> None:
    """A lung2-like axis of 401 voxels: the grid's windows start at 0, 168 and 177 (clamped to the border).
    Lungs from 84 to 328 need the first two; from 200 to 380 the clamped one alone (slices 30 to 40: the one at
    29); a box reaching the far border all three. An axis smaller than the ROI has its one padded window at 0."""
    shape, roi = (61, 401, 20), (32, 224, 224)
    cover = lattice_cover((slice(0, 61), slice(84, 328), slice(0, 20)), shape, roi, 0.25)
    assert cover == [frozenset({0, 24, 29}), frozenset({0, 168}), frozenset({0})]
    assert lattice_cover((slice(30, 40), slice(200, 380), slice(5, 6)), shape, roi, 0.25)[:2] == [
        frozenset({29}),
        frozenset({177}),
    ]
    assert lattice_cover((slice(0, 1), slice(84, 401), slice(0, 1)), shape, roi, 0.25)[1] == frozenset({0, 168, 177})
    windows = lattice_windows(shape, roi, 0.25)
    assert len(windows) == 9 and all(w[2] == slice(0, 20) for w in windows)


def test_windows_over_the_lung_fields_agree_with_the_whole_grid() -> None:
    image = _chest()
    full_backend, skip_backend = ThresholdBackend(), ThresholdBackend()
    full = segment(image, _spec(windows="all"), full_backend)
    skip = segment(image, _spec(windows="lung_fields"), skip_backend)
    a, b = sitk.GetArrayViewFromImage(full.label) > 0, sitk.GetArrayViewFromImage(skip.label) > 0
    assert a.sum() > 100  # the lesion is found
    # A pointwise model predicts the same in every window, so the blend of the windows kept is the whole grid's.
    np.testing.assert_array_equal(a, b)
    assert skip.windows == full.windows == full.windows_run
    assert skip.windows_run == skip_backend.windows < full_backend.windows == full.windows
    assert skip.windows / skip.windows_run >= 1.5


def test_no_lungs_no_windows() -> None:
    hu = np.full((20, 64, 64), 40.0, dtype=np.float32)  # soft tissue only: no lung fields
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((1.6, 1.6, 5.0))
    backend = ThresholdBackend()
    result = segment(image, _spec(windows="lung_fields"), backend)
    assert result.windows_run == backend.windows == 0 and result.windows > 0
    assert not sitk.GetArrayViewFromImage(result.label).any()
    assert result.label.GetSize() == image.GetSize()


def test_a_spec_without_lung_fields_runs_every_window() -> None:
    spec = _spec(windows="lung_fields")
    spec = dataclasses.replace(spec, post=dataclasses.replace(spec.post, lung_fields=None))
    backend = ThresholdBackend()
    result = segment(_chest(), spec, backend)
    assert result.windows_run == result.windows == backend.windows


# -- the Triton fleet ---------------------------------------------------------------------------------------


class FakeEndpoint:
    """A TritonBackend stand-in: answers with its own id, or fails as an outage or a model error."""

    def __init__(self, url: str, *, down: bool = False, delay_s: float = 0.0) -> None:
        self.url = url
        self.max_in_flight = 2
        self.down = down
        self.mismatch = False
        self.delay = threading.Event()
        self.delay_s = delay_s
        self.calls = 0
        self.checks = 0

    def check(self) -> None:
        self.checks += 1
        if self.mismatch:
            raise ModelMismatch(f"{self.url}: wrong model")
        if self.down:
            raise BackendUnavailable(f"Triton at {self.url} is unreachable")

    def infer(self, batch: np.ndarray) -> np.ndarray:
        if self.down:
            raise BackendUnavailable(f"Triton at {self.url}: no answer")
        self.calls += 1
        if self.delay_s:
            self.delay.wait(self.delay_s)
        return np.full((batch.shape[0], 1), float(self.url[-1]), dtype=np.float32)

    def close(self) -> None: ...


def _fleet(*endpoints: FakeEndpoint) -> TritonFleet:
    return TritonFleet(endpoints, probe_initial_s=0.05, probe_max_s=0.2)  # type: ignore[arg-type]


def test_fleet_spreads_requests_by_least_in_flight() -> None:
    a, b = FakeEndpoint("h:1", delay_s=0.3), FakeEndpoint("h:2", delay_s=0.3)
    fleet = _fleet(a, b)
    fleet.check()
    threads = [threading.Thread(target=fleet.infer, args=(np.zeros((1, 1)),)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (a.calls, b.calls) == (2, 2)
    assert fleet.max_in_flight == 4


def test_fleet_fails_over_and_probes_the_lost_endpoint_again() -> None:
    a, b = FakeEndpoint("h:1"), FakeEndpoint("h:2")
    fleet = _fleet(a, b)
    fleet.check()
    a.down = True
    answers = {float(fleet.infer(np.zeros((1, 1)))[0, 0]) for _ in range(6)}
    assert answers == {2.0}  # every request answered, by the healthy endpoint
    assert not fleet.states[0].healthy and "no answer" in fleet.states[0].reason
    a.down = False
    import time

    time.sleep(0.25)  # past the probe backoff
    answers = {float(fleet.infer(np.zeros((1, 1)))[0, 0]) for _ in range(4)}
    assert answers == {1.0, 2.0} and fleet.states[0].healthy


def test_fleet_fails_by_name_when_no_endpoint_answers() -> None:
    a, b = FakeEndpoint("h:1", down=True), FakeEndpoint("h:2", down=True)
    fleet = _fleet(a, b)
    with pytest.raises(BackendUnavailable, match=r"no Triton endpoint is available .*h:1.*h:2"):
        fleet.check()
    b.down = False
    fleet.check()  # one healthy endpoint is enough
    b.down = True
    with pytest.raises(BackendUnavailable, match=r"h:1.*h:2"):
        fleet.infer(np.zeros((1, 1)))


def test_fleet_raises_a_model_mismatch_as_it_is() -> None:
    a, b = FakeEndpoint("h:1"), FakeEndpoint("h:2")
    b.mismatch = True
    with pytest.raises(ModelMismatch, match="wrong model"):
        _fleet(a, b).check()


def test_gpu_model_configurations_parse_and_name_the_spec_tensors() -> None:
    text_format = pytest.importorskip("google.protobuf.text_format")
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    spec = json.loads((REPO / "config" / "config_inference.json").read_text())
    folder = REPO / "models" / "segmentation_ct_covid_lesion_v1"
    for path in [folder / "config.pbtxt", *sorted((folder / "configs").glob("*.pbtxt"))]:
        config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        assert config.name == spec["model"]["name"], path
        assert [i.name for i in config.input] == [spec["model"]["input"]["name"]], path
        assert [o.name for o in config.output] == [spec["model"]["output"]["name"]], path
    gpu = text_format.Parse((folder / "configs" / "onnxruntime_gpu.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert gpu.backend == "onnxruntime" and gpu.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert list(gpu.dynamic_batching.preferred_batch_size)
    trt = text_format.Parse(
        (folder / "configs" / "onnxruntime_tensorrt.pbtxt").read_text(), model_config_pb2.ModelConfig()
    )
    assert trt.optimization.execution_accelerators.gpu_execution_accelerator[0].name == "tensorrt"


def test_a_box_that_saves_no_window_keeps_the_whole_grid() -> None:
    """Lungs from border to border: the box would run as many windows as the grid, so the grid's own windows run
    and the labels are exactly the whole grid's."""
    z, y, x = np.meshgrid(np.arange(16), np.arange(64), np.arange(64), indexing="ij")
    hu = np.full(z.shape, 40.0, dtype=np.float32)
    for cx in (17, 46):
        hu[(((x - cx) / 14.0) ** 2 + ((y - 32) / 28.0) ** 2 <= 1)] = -850.0
    hu[(((x - 17) / 4.0) ** 2 + ((y - 32) / 4.0) ** 2 <= 1) & (z > 4) & (z < 10)] = -150.0
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((1.6, 1.6, 5.0))
    roi = [64, 64, 8]  # one window in-plane: any box needs it, and all three along z
    full = segment(image, _spec(windows="all", roi_size=roi), ThresholdBackend())
    lungs = segment(image, _spec(windows="lung_fields", roi_size=roi), ThresholdBackend())
    assert lungs.windows_run == lungs.windows == full.windows
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(lungs.label), sitk.GetArrayViewFromImage(full.label))


def test_fleet_endpoints_are_exported_as_metrics(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from dicom_node.db import Database
    from dicom_node.ops.metrics import StateCollector

    a, b = FakeEndpoint("h:1"), FakeEndpoint("h:2", down=True)
    fleet = _fleet(a, b)
    fleet.check()
    fleet.infer(np.zeros((1, 1)))
    db = Database(tmp_path / "state.sqlite3")
    registry = CollectorRegistry()
    registry.register(StateCollector(db, tmp_path, lambda: None, lambda: fleet.states))
    text = generate_latest(registry).decode()
    db.close()
    assert 'dicom_node_triton_endpoint_up{endpoint="h:1"} 1.0' in text
    assert 'dicom_node_triton_endpoint_up{endpoint="h:2"} 0.0' in text
    assert 'dicom_node_triton_endpoint_requests_total{endpoint="h:1"} 1.0' in text
    assert 'dicom_node_triton_endpoint_failures_total{endpoint="h:2"} 1.0' in text
