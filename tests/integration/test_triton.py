"""A real tritonserver (nvidia-pytriton wheel, python backend running model.py -> ONNX Runtime), started by the
tests on free ports: readiness, gRPC/HTTP with and without shared memory against in-process ONNX Runtime,
mismatch and unreachable errors, ``dicom-node triton`` under SIGTERM, and Triton = ONNX Runtime labels on lung1.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from inference.errors import BackendUnavailable, ModelMismatch
from inference.onnx_backend import OnnxRuntimeBackend
from inference.spec import InferenceSpec
from inference.triton_backend import TritonBackend
from inference.triton_server import ManagedTriton, TritonServerOptions
from tests.dimse import free_ports

pytestmark = pytest.mark.integration

DICOM_NODE = Path(sys.executable).with_name("dicom-node")
MODEL = "segmentation_ct_covid_lesion_v1"


def _url(server: ManagedTriton, protocol: str) -> str:
    return server.grpc_url if protocol == "grpc" else server.http_url


@pytest.fixture(scope="module")
def onnx_backend(inference_spec: InferenceSpec, model_repository: Path) -> OnnxRuntimeBackend:
    backend = OnnxRuntimeBackend(inference_spec, inference_spec.model.onnx_path(model_repository))
    backend.check()
    return backend


def test_server_starts_and_model_is_ready(triton_server: ManagedTriton) -> None:
    assert triton_server.running()
    assert triton_server.startup_s is not None and triton_server.startup_s < 60
    print(f"\ntritonserver start -> model ready: {triton_server.startup_s:.2f} s")
    url = f"http://{triton_server.http_url}/v2/models/{MODEL}"
    with urllib.request.urlopen(url + "/ready", timeout=5) as resp:
        assert resp.status == 200
    with urllib.request.urlopen(url, timeout=5) as resp:
        meta = json.load(resp)
    assert meta["platform"] == "python"
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
        ("NV_MODEL_INPUT", "FP32", [-1, 1, -1, -1, -1])
    ]
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["outputs"]] == [
        ("NV_MODEL_OUTPUT", "FP32", [-1, 2, -1, -1, -1])
    ]


def test_full_window_batch_matches_onnxruntime_and_timing(
    triton_server: ManagedTriton, inference_spec: InferenceSpec, onnx_backend: OnnxRuntimeBackend
) -> None:
    """The request the pipeline sends (batch_size windows of the ROI) over gRPC: same output as ONNX Runtime."""
    x, y, z = inference_spec.inferer.roi_size
    batch = np.random.default_rng(1).random((inference_spec.inferer.batch_size, 1, x, y, z), dtype=np.float32)
    expected = onnx_backend.infer(batch)
    with TritonBackend(inference_spec, triton_server.grpc_url) as backend:
        backend.check()
        backend.infer(batch[:1])  # first request: the python stub warms up
        t0 = time.perf_counter()
        got = backend.infer(batch)
        seconds = time.perf_counter() - t0
    print(f"\n{list(batch.shape)} float32 over gRPC: {seconds:.2f} s")
    assert got.shape == expected.shape == (batch.shape[0], 2, x, y, z)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("protocol", "shm"), [("grpc", False), ("grpc", True), ("http", False), ("http", True)])
def test_protocols_and_shared_memory_match_onnxruntime(
    triton_server: ManagedTriton,
    inference_spec: InferenceSpec,
    onnx_backend: OnnxRuntimeBackend,
    protocol: str,
    shm: bool,
) -> None:
    """Several requests in flight from several threads, different batch sizes: each equals ONNX Runtime."""
    rng = np.random.default_rng(2)
    batches = [rng.random((n, 1, 64, 48, 32), dtype=np.float32) for n in (2, 1, 3)]
    expected = [onnx_backend.infer(b) for b in batches]
    backend = TritonBackend(
        inference_spec,
        _url(triton_server, protocol),
        protocol=protocol,  # type: ignore[arg-type]
        shared_memory=shm,
        max_in_flight=2,
    )
    try:
        backend.check()
        with ThreadPoolExecutor(max_workers=3) as pool:
            results = list(pool.map(backend.infer, batches))
        for got, want in zip(results, expected, strict=True):
            assert got.dtype == np.float32 and got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    finally:
        backend.close()
        backend.close()  # idempotent
    if shm:
        leftovers = [p for p in os.listdir("/dev/shm") if p.startswith(f"dicomnode_{os.getpid()}_")]
        assert leftovers == [], f"shared memory regions left behind: {leftovers}"


def test_shared_memory_grows_past_an_unregister_that_failed(
    triton_server: ManagedTriton,
    inference_spec: InferenceSpec,
    onnx_backend: OnnxRuntimeBackend,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bigger batch replaces the slot's regions; when the server never saw the old ones unregistered (a control
    call that timed out under load, as seen in CI), the new regions must not collide with the old names."""
    backend = TritonBackend(inference_spec, _url(triton_server, "grpc"), protocol="grpc", shared_memory=True)
    real_call = backend._client_call

    def unregister_times_out(client: object, method: str, *args: object, **kwargs: object) -> object:
        if method == "unregister_system_shared_memory":
            raise TimeoutError("simulated: the server did not answer in time")
        return real_call(client, method, *args, **kwargs)

    rng = np.random.default_rng(5)
    try:
        backend.check()
        monkeypatch.setattr(backend, "_client_call", unregister_times_out)
        for n in (1, 2, 3):  # one slot, regions grown twice
            batch = rng.random((n, 1, 64, 48, 32), dtype=np.float32)
            np.testing.assert_allclose(backend.infer(batch), onnx_backend.infer(batch), rtol=1e-5, atol=1e-5)
    finally:
        monkeypatch.undo()
        backend.close()
    leftovers = [p for p in os.listdir("/dev/shm") if p.startswith(f"dicomnode_{os.getpid()}_")]
    assert leftovers == [], f"shared memory regions left behind: {leftovers}"


def _spec_with(spec: InferenceSpec, **model_changes: object) -> InferenceSpec:
    model = spec.model
    if "input_name" in model_changes:
        model = dataclasses.replace(model, input=dataclasses.replace(model.input, name=model_changes["input_name"]))
    if "output_channels" in model_changes:
        model = dataclasses.replace(model, output_channels=model_changes["output_channels"])
    if "name" in model_changes:
        model = dataclasses.replace(model, name=model_changes["name"])
    return dataclasses.replace(spec, model=model)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_wrong_tensor_name_is_a_model_mismatch(
    triton_server: ManagedTriton, inference_spec: InferenceSpec, protocol: str
) -> None:
    spec = _spec_with(inference_spec, input_name="NV_INPUT_WRONG")
    with (
        TritonBackend(spec, _url(triton_server, protocol), protocol=protocol) as backend,  # type: ignore[arg-type]
        pytest.raises(ModelMismatch) as info,
    ):
        backend.check()
    msg = str(info.value)
    assert "tensor names do not match" in msg and "'NV_INPUT_WRONG'" in msg and "'NV_MODEL_INPUT'" in msg
    assert MODEL in msg and _url(triton_server, protocol) in msg


def test_wrong_channel_count_is_a_model_mismatch(triton_server: ManagedTriton, inference_spec: InferenceSpec) -> None:
    spec = _spec_with(inference_spec, output_channels=3)
    with TritonBackend(spec, triton_server.grpc_url) as backend, pytest.raises(ModelMismatch) as info:
        backend.check()
    msg = str(info.value)
    assert "'NV_MODEL_OUTPUT' has 2 channels" in msg and "needs 3" in msg


def test_model_missing_on_server_is_a_model_mismatch(
    triton_server: ManagedTriton, inference_spec: InferenceSpec
) -> None:
    spec = _spec_with(inference_spec, name="no_such_model")
    with TritonBackend(spec, triton_server.grpc_url) as backend, pytest.raises(ModelMismatch) as info:
        backend.check()
    msg = str(info.value)
    assert "'no_such_model'" in msg and "no such model" in msg and MODEL in msg


def test_model_missing_from_repository_fails_before_starting(tmp_path: Path) -> None:
    (tmp_path / "other_model" / "1").mkdir(parents=True)
    (tmp_path / "other_model" / "config.pbtxt").write_text('name: "other_model"\nbackend: "python"\n')
    options = TritonServerOptions(
        models=(MODEL,), **dict(zip(("http_port", "grpc_port", "metrics_port"), free_ports(3), strict=True))
    )
    with pytest.raises(ModelMismatch) as info:
        ManagedTriton(tmp_path, options).start()
    msg = str(info.value)
    assert f"'{MODEL}' is missing from the model repository {tmp_path}" in msg and "other_model" in msg


def test_model_that_fails_to_load_names_model_and_quotes_log(tmp_path: Path, model_repository: Path) -> None:
    """No model.onnx in the version folder: the server exits; the error names the model and quotes its log."""
    repo = tmp_path / "repo"
    (repo / MODEL / "1").mkdir(parents=True)
    src = model_repository / MODEL
    (repo / MODEL / "config.pbtxt").write_text((src / "config.pbtxt").read_text())
    (repo / MODEL / "1" / "model.py").write_text((src / "1" / "model.py").read_text())
    http, grpc, metrics = free_ports(3)
    server = ManagedTriton(
        repo, TritonServerOptions(http_port=http, grpc_port=grpc, metrics_port=metrics, startup_timeout_s=60)
    )
    with pytest.raises(BackendUnavailable) as info:
        server.start()
    first, *rest = str(info.value).splitlines()
    assert f"model '{MODEL}': exited with status" in first
    assert "model.onnx not found" in first  # model.py's own message, from the server log
    assert rest and rest[0] == "last lines of the server log:"
    assert not server.running()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_unreachable_server_is_backend_unavailable_fast(inference_spec: InferenceSpec, protocol: str) -> None:
    (port,) = free_ports(1)
    url = f"127.0.0.1:{port}"
    t0 = time.perf_counter()
    with TritonBackend(inference_spec, url, protocol=protocol, connect_timeout_s=2.0) as backend:  # type: ignore[arg-type]
        with pytest.raises(BackendUnavailable) as info:
            backend.check()
        assert time.perf_counter() - t0 < 5.0
        assert url in str(info.value) and "unreachable" in str(info.value)


def test_infer_retries_connection_errors_a_bounded_number_of_times(
    triton_server: ManagedTriton, inference_spec: InferenceSpec
) -> None:
    """Checked against a live server, then pointed at a dead port: infer gives up after 1 + retries attempts."""
    (port,) = free_ports(1)
    backend = TritonBackend(inference_spec, triton_server.grpc_url, retries=2, retry_backoff_s=0.01)
    try:
        backend.check()
        backend.url = f"127.0.0.1:{port}"
        backend._grpc_client = None  # the next request dials the dead port
        t0 = time.perf_counter()
        with pytest.raises(BackendUnavailable) as info:
            backend.infer(np.zeros((1, 1, 32, 32, 32), np.float32))
        assert time.perf_counter() - t0 < 10.0
        assert "after 3 attempt(s)" in str(info.value)
    finally:
        backend.close()


def test_model_error_is_not_retried(triton_server: ManagedTriton, inference_spec: InferenceSpec) -> None:
    """A batch larger than max_batch_size is refused by the server: an InferenceError at once, no retries."""
    from inference.errors import InferenceError

    with TritonBackend(inference_spec, triton_server.grpc_url, retries=5, retry_backoff_s=5.0) as backend:
        backend.check()
        t0 = time.perf_counter()
        with pytest.raises(InferenceError) as info:
            backend.infer(np.zeros((9, 1, 16, 16, 16), np.float32))
        assert time.perf_counter() - t0 < 5.0
        assert not isinstance(info.value, BackendUnavailable)
        assert "batch" in str(info.value)


def test_open_backend_uses_a_running_server(
    triton_server: ManagedTriton, inference_spec: InferenceSpec, model_repository: Path
) -> None:
    from dicom_node.inference_runtime import open_backend
    from dicom_node.settings import Settings

    settings = Settings.model_validate(
        {"inference": {"model_repository": str(model_repository), "triton": {"url": triton_server.grpc_url}}}
    )
    with open_backend(settings, inference_spec) as backend:
        assert isinstance(backend, TritonBackend) and backend.url == triton_server.grpc_url
        out = backend.infer(np.zeros((1, 1, 32, 32, 32), np.float32))
        assert out.shape == (1, 2, 32, 32, 32)


def test_open_backend_starts_a_managed_server_and_stops_it(
    inference_spec: InferenceSpec, model_repository: Path
) -> None:
    """Nothing answers at the (local) URL and managed is true: the node starts its own tritonserver."""
    from dicom_node.inference_runtime import open_backend
    from dicom_node.settings import Settings

    http, grpc, metrics = free_ports(3)
    settings = Settings.model_validate(
        {
            "inference": {
                "model_repository": str(model_repository),
                "triton": {"url": f"localhost:{grpc}", "http_port": http, "grpc_port": 1, "metrics_port": metrics},
            }
        }
    )
    with open_backend(settings, inference_spec) as backend:
        assert isinstance(backend, TritonBackend) and backend.url == f"127.0.0.1:{grpc}"  # the URL's port wins
        out = backend.infer(np.zeros((1, 1, 32, 32, 32), np.float32))
        assert out.shape == (1, 2, 32, 32, 32)
    with pytest.raises(OSError):  # stopped: nothing listens any more
        socket.create_connection(("127.0.0.1", grpc), timeout=1).close()


def test_open_backend_onnxruntime(inference_spec: InferenceSpec, model_repository: Path) -> None:
    from dicom_node.inference_runtime import open_backend
    from dicom_node.settings import Settings

    settings = Settings.model_validate({"inference": {"model_repository": str(model_repository)}})
    with open_backend(settings, inference_spec, "onnxruntime") as backend:
        assert isinstance(backend, OnnxRuntimeBackend)


def test_dicom_node_triton_starts_and_stops_on_sigterm(tmp_path: Path, model_repository: Path) -> None:
    http, grpc, metrics = free_ports(3)
    cfg = tmp_path / "node.yaml"
    cfg.write_text(
        f"inference:\n  triton:\n    url: 127.0.0.1:{grpc}\n    http_port: {http}\n    grpc_port: {grpc}\n"
        f"    metrics_port: {metrics}\n    startup_timeout_s: 60\n"
    )
    proc = subprocess.Popen(
        [str(DICOM_NODE), "triton", "--model-repository", str(model_repository), "--settings", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        ready = False
        while time.monotonic() < deadline and proc.poll() is None and not ready:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/models/{MODEL}/ready", timeout=2) as r:
                    ready = r.status == 200
            except OSError:
                time.sleep(0.2)
        assert ready, f"dicom-node triton never answered ready (exit {proc.poll()})"
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out[-3000:]
    assert "dicom-node triton: ready" in out
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", http), timeout=1).close()


# -- dicom-node infer --backend triton: the one-line errors -------------------------------------------------------


@pytest.fixture(scope="module")
def small_input(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("small_input")
    image = sitk.GetImageFromArray(np.full((8, 40, 40), -500, np.int16))
    image.SetSpacing((0.8, 0.8, 5.0))
    sitk.WriteImage(image, str(folder / "small.nii.gz"))
    return folder


def _infer(settings: Path, inp: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [
        str(DICOM_NODE),
        "infer",
        "--input",
        str(inp),
        "--output",
        str(out),
        "--settings",
        str(settings),
        "--backend",
        "triton",
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def test_cli_triton_unreachable_one_line(
    tmp_path: Path, small_input: Path, model_repository: Path, repo_root: Path
) -> None:
    (port,) = free_ports(1)
    cfg = tmp_path / "node.yaml"
    cfg.write_text(
        f"inference:\n  config: {repo_root / 'config' / 'config_inference.json'}\n"
        f"  model_repository: {model_repository}\n  triton:\n    url: 127.0.0.1:{port}\n    managed: false\n"
    )
    proc = _infer(cfg, small_input, tmp_path / "out")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    # Names the input volume, the server and the cause.
    assert lines[0].startswith(f"dicom-node: error: {small_input / 'small.nii.gz'}: ")
    assert f"Triton at 127.0.0.1:{port}" in lines[0]
    assert "unreachable" in lines[0] and "managed is false" in lines[0]


def test_cli_managed_model_file_missing_one_line(tmp_path: Path, small_input: Path, repo_root: Path) -> None:
    """Managed start on a repository whose model has no model.onnx: one line naming the file, no server start."""
    repo = tmp_path / "models"
    (repo / MODEL / "1").mkdir(parents=True)
    src = repo_root / "models" / MODEL
    (repo / MODEL / "config.pbtxt").write_text((src / "config.pbtxt").read_text())
    (repo / MODEL / "1" / "model.py").write_text((src / "1" / "model.py").read_text())
    http, grpc, metrics = free_ports(3)
    cfg = tmp_path / "node.yaml"
    cfg.write_text(
        f"inference:\n  config: {repo_root / 'config' / 'config_inference.json'}\n  model_repository: {repo}\n"
        f"  triton:\n    url: 127.0.0.1:{grpc}\n    http_port: {http}\n    metrics_port: {metrics}\n"
    )
    proc = _infer(cfg, small_input, tmp_path / "out")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"{repo / MODEL / '1' / 'model.onnx'}: model file not found" in lines[0]


def test_cli_tensor_name_mismatch_one_line(
    tmp_path: Path, small_input: Path, triton_server: ManagedTriton, repo_root: Path, model_repository: Path
) -> None:
    spec = json.loads((repo_root / "config" / "config_inference.json").read_text())
    spec["model"]["output"]["name"] = "SEGMENTATION"
    spec_path = tmp_path / "config_inference.json"
    spec_path.write_text(json.dumps(spec))
    cfg = tmp_path / "node.yaml"
    cfg.write_text(
        f"inference:\n  model_repository: {model_repository}\n  triton:\n    url: {triton_server.grpc_url}\n"
        "    managed: false\n"
    )
    proc = _infer(cfg, small_input, tmp_path / "out", "--config", str(spec_path))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "tensor names do not match" in lines[0] and "'SEGMENTATION'" in lines[0] and str(spec_path) in lines[0]


# -- acceptance -----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_triton_and_onnxruntime_give_identical_labels_on_lung1(
    shared_data: Path,
    triton_server: ManagedTriton,
    inference_spec: InferenceSpec,
    onnx_backend: OnnxRuntimeBackend,
) -> None:
    from inference.pipeline import segment

    image = sitk.ReadImage(str(shared_data / "chest_ct_volumes" / "lung1_image.nrrd"))
    t0 = time.perf_counter()
    with TritonBackend(inference_spec, triton_server.grpc_url) as backend:
        backend.check()
        via_triton = segment(image, inference_spec, backend)
    t1 = time.perf_counter()
    via_onnx = segment(image, inference_spec, onnx_backend)
    t2 = time.perf_counter()
    print(f"\nlung1: Triton {t1 - t0:.1f} s, ONNX Runtime {t2 - t1:.1f} s, {via_triton.windows} windows")
    a = sitk.GetArrayFromImage(via_triton.label)
    b = sitk.GetArrayFromImage(via_onnx.label)
    assert via_triton.label.GetSize() == image.GetSize()
    assert via_triton.label.GetOrigin() == image.GetOrigin()
    assert via_triton.label.GetSpacing() == image.GetSpacing()
    assert via_triton.label.GetDirection() == image.GetDirection()
    assert np.array_equal(a, b), f"{int((a != b).sum())} voxels differ"
