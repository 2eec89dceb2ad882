"""Inference that scales (issue 20) against real servers: windows only where the lungs are, on both backends,
agreeing with the whole grid; and two real tritonservers, one killed mid-job, as one fleet."""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from inference.onnx_backend import OnnxRuntimeBackend
from inference.pipeline import SegmentationResult, segment
from inference.spec import InferenceSpec
from inference.triton_backend import TritonBackend
from inference.triton_fleet import TritonFleet
from inference.triton_server import ManagedTriton, TritonServerOptions
from tests import factories
from tests.dimse import free_ports

pytestmark = pytest.mark.integration


def _windows(spec: InferenceSpec, mode: str, batch_size: int | None = None) -> InferenceSpec:
    inferer = dataclasses.replace(spec.inferer, windows=mode, batch_size=batch_size or spec.inferer.batch_size)
    return dataclasses.replace(spec, inferer=inferer)


def _dice(a: SegmentationResult, b: SegmentationResult) -> float:
    x, y = sitk.GetArrayViewFromImage(a.label) > 0, sitk.GetArrayViewFromImage(b.label) > 0
    total = int(x.sum() + y.sum())
    return 1.0 if total == 0 else 2.0 * int((x & y).sum()) / total


TRAINING = Path(__file__).resolve().parents[2] / "models" / "training"


@pytest.fixture(scope="module")
def lung1_image(shared_data: Path) -> sitk.Image:
    return factories.read_volume(shared_data / "chest_ct_volumes" / "lung1_image.nrrd")


@pytest.fixture(scope="module")
def lung1_with_ggo(shared_data: Path) -> sitk.Image:
    """lung1 with six ground-glass opacities inserted by the training simulator (a seed training never drew), so
    the masks hold lesions to agree on, not only the few voxels a clean scan gets."""
    sys.path.insert(0, str(TRAINING))
    try:
        import common
        import simulate
    finally:
        sys.path.remove(str(TRAINING))
    img, solid = common.load_real("lung1")
    hu = sitk.GetArrayFromImage(img)
    spacing = img.GetSpacing()
    hu2, _label, _lesions = simulate.insert_ggo(
        hu, spacing, np.random.default_rng([2020, 0]), 6, exclude=solid, lung=simulate.lung_mask(hu, spacing)
    )
    image: sitk.Image = common.with_array(hu2.astype(np.float32), img)
    return image


def test_lung_windows_agree_with_the_whole_grid_on_both_backends(
    lung1_with_ggo: sitk.Image, inference_spec: InferenceSpec, model_repository: Path, triton_server: ManagedTriton
) -> None:
    """Half the windows, the same labels; bench/infer.py repeats the comparison on all seven real chest CTs and
    the real COVID-19 CT."""
    image = lung1_with_ggo
    onnx = OnnxRuntimeBackend(inference_spec, inference_spec.model.onnx_path(model_repository), 2)
    onnx.check()
    try:
        full = segment(image, _windows(inference_spec, "all"), onnx)
        lungs = segment(image, _windows(inference_spec, "lung_fields"), onnx)
    finally:
        onnx.close()
    assert full.windows == lungs.windows == 8 and full.windows_run == 8
    assert lungs.windows_run == 4
    assert int((sitk.GetArrayViewFromImage(full.label) > 0).sum()) > 500
    assert _dice(full, lungs) >= 0.99
    with TritonBackend(inference_spec, triton_server.grpc_url) as triton:
        via_triton = segment(image, _windows(inference_spec, "lung_fields"), triton)
    assert via_triton.windows_run == 4
    assert _dice(via_triton, lungs) >= 0.99


def test_a_fleet_survives_a_server_killed_mid_job(
    lung1_image: sitk.Image, inference_spec: InferenceSpec, model_repository: Path, triton_server: ManagedTriton
) -> None:
    spec = _windows(inference_spec, "lung_fields", batch_size=1)  # 4 requests: room to lose a server between two
    with TritonBackend(spec, triton_server.grpc_url) as single:
        reference = segment(lung1_image, spec, single)
    http, grpc, metrics = free_ports(3)
    second = ManagedTriton(
        model_repository,
        TritonServerOptions(http_port=http, grpc_port=grpc, metrics_port=metrics, startup_timeout_s=120),
    )
    with second:
        a = TritonBackend(spec, triton_server.grpc_url, retries=0, max_in_flight=1)
        b = TritonBackend(spec, second.grpc_url, retries=0, max_in_flight=1)
        fleet = TritonFleet([a, b], probe_initial_s=0.5, probe_max_s=2.0)
        fleet.check()
        result: list[SegmentationResult] = []
        errors: list[BaseException] = []

        def job() -> None:
            try:
                result.append(segment(lung1_image, spec, fleet))
            except BaseException as exc:
                errors.append(exc)

        worker = threading.Thread(target=job)
        worker.start()
        deadline = time.monotonic() + 120
        while fleet.states[1].requests < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert fleet.states[1].requests >= 1  # the second server took part ...
        second.stop()  # ... and is killed mid-job
        worker.join(300)
        fleet.close()
    assert not errors, errors
    assert result and fleet.states[0].requests > fleet.states[1].requests
    assert not fleet.states[1].healthy and fleet.states[1].failures >= 1
    np.testing.assert_array_equal(
        sitk.GetArrayViewFromImage(result[0].label), sitk.GetArrayViewFromImage(reference.label)
    )
