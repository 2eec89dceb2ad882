"""The node end to end, every part real: dcmtk storescu sends a CT series, the node stores, completes,
reconstructs, segments (ONNX Runtime or a real tritonserver), writes a SEG and C-STOREs it to dcmtk storescp or
Orthanc; dciodvfy validates what arrives."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import JPEGLosslessSV1

from dicom_node.daemon import Node
from dicom_node.file_mode import run_file_mode
from dicom_node.jobs import JobState
from dicom_node.settings import Settings
from tests import factories
from tests.dicom_peers import Orthanc, orthanc_binary, storescp
from tests.dimse import free_port, node_config, settings_for, storescu, wait_for, wait_port
from tests.seg_helpers import dciodvfy_errors, have_dciodvfy, place_on_grid, seg_frames

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
NODE_BIN = REPO / ".venv" / "bin" / "dicom-node"
JOB_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def lung1_series(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> factories.WrittenSeries:
    out = tmp_path_factory.mktemp("lung1_e2e")
    image = factories.read_volume(shared_data / "chest_ct_volumes" / "lung1_image.nrrd")
    return factories.write_ct_series(image, out, transfer_syntax=JPEGLosslessSV1, shuffle=True, tag="lung1-e2e")


@pytest.fixture(scope="module")
def file_mode_label(
    lung1_series: factories.WrittenSeries, model_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> sitk.Image:
    """What the file-mode operator makes of the same volume (ONNX Runtime): the reference for the SEG's mask."""
    work = tmp_path_factory.mktemp("file_mode")
    (work / "in").mkdir()
    sitk.WriteImage(lung1_series.image, str(work / "in" / "lung1.mha"))
    settings = settings_for(work / "var", free_port(), inference={"model_repository": str(model_repository)})
    assert run_file_mode(settings, input_dir=work / "in", output_dir=work / "out", backend="onnxruntime") == 0
    return sitk.ReadImage(str(work / "out" / "lung1.mhd"))


def _node(tmp_path: Path, model_repository: Path, destinations: list[dict[str, Any]], **sections: Any) -> Node:
    inference = {"model_repository": str(model_repository), **sections.pop("inference", {})}
    export = {"backoff": {"initial_s": 1.0, "max_s": 5.0}, **sections.pop("export", {})}
    settings = settings_for(
        tmp_path / "var",
        free_port(),
        series={"quiet_seconds": 30, "poll_interval_s": 0.1},
        destinations=destinations,
        export=export,
        inference=inference,
        **sections,
    )
    return Node(settings)


def _finished_job(node: Node, series_uid: str) -> Any:
    assert node.db is not None

    def finished() -> Any:
        jobs = [j for j in node.db.jobs() if j.series_instance_uid == series_uid] if node.db else []
        return jobs if jobs and all(j.state.terminal for j in jobs) else None

    jobs = wait_for(finished, JOB_TIMEOUT_S, interval=0.5)
    assert jobs, f"no finished job for {series_uid}: {node.db.jobs()}"
    assert len(jobs) == 1, jobs
    return jobs[0]


def _assert_seg_matches(seg_path: Path, sent: factories.WrittenSeries, reference: sitk.Image, tmp: Path) -> None:
    ds = pydicom.dcmread(seg_path)
    assert ds.Modality == "SEG"
    assert ds.StudyInstanceUID == sent.study_instance_uid
    assert ds.FrameOfReferenceUID == sent.frame_of_reference_uid
    referenced = {
        str(item.ReferencedSOPInstanceUID)
        for series in ds.ReferencedSeriesSequence
        for item in series.ReferencedInstanceSequence
    }
    assert referenced == set(sent.sop_instance_uids)
    if have_dciodvfy():
        assert dciodvfy_errors(seg_path, tmp) == []
    _, frames = seg_frames(seg_path)
    placed = place_on_grid(reference, frames)
    np.testing.assert_array_equal(placed, sitk.GetArrayFromImage(reference))


def test_storescu_to_node_to_storescp(
    tmp_path: Path, lung1_series: factories.WrittenSeries, model_repository: Path, file_mode_label: sitk.Image
) -> None:
    with storescp(tmp_path / "pacs") as pacs:
        node = _node(tmp_path, model_repository, [{"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port}])
        node.start()
        try:
            result = storescu(node.port, lung1_series.files)
            assert result.returncode == 0, result.stderr
            job = _finished_job(node, lung1_series.series_instance_uid)
            assert job.state is JobState.DONE, job
            assert job.attempts == 1
            received = wait_for(lambda: pacs.received_files() or None, 10)
            assert received and len(received) == 1
            _assert_seg_matches(received[0], lung1_series, file_mode_label, tmp_path)
            assert pacs.store_requests() == 1
            # Every stage of the job was timed into the node's metrics, and each model request too.
            m = node.metrics
            for stage in ("decode", "reconstruct", "inference", "seg", "export"):
                assert m.registry.get_sample_value("dicom_node_stage_duration_seconds_count", {"stage": stage}) == 1
            requests = m.registry.get_sample_value(
                "dicom_node_inference_request_duration_seconds_count", {"backend": "onnxruntime"}
            )
            assert requests is not None and requests >= 1
        finally:
            node.stop(grace_s=5)


@pytest.mark.skipif(orthanc_binary() is None, reason="Orthanc is not installed")
def test_storescu_to_node_to_orthanc_through_triton(
    tmp_path: Path,
    lung1_series: factories.WrittenSeries,
    model_repository: Path,
    triton_server: Any,
    file_mode_label: sitk.Image,
) -> None:
    orthanc = Orthanc(tmp_path / "orthanc").start()
    try:
        # The PACS already holds the CT study, as it would in a hospital: the SEG must land in it.
        sent = storescu(orthanc.dicom_port, lung1_series.files, aet="MODALITY")
        assert sent.returncode == 0, sent.stderr
        node = _node(
            tmp_path,
            model_repository,
            [{"ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.dicom_port}],
            inference={"backend": "triton", "triton": {"url": triton_server.grpc_url, "managed": False}},
        )
        node.start()
        try:
            result = storescu(node.port, lung1_series.files)
            assert result.returncode == 0, result.stderr
            job = _finished_job(node, lung1_series.series_instance_uid)
            assert job.state is JobState.DONE, job
        finally:
            node.stop(grace_s=5)
        found = orthanc.post(
            "/tools/find",
            {"Level": "Series", "Query": {"StudyInstanceUID": lung1_series.study_instance_uid, "Modality": "SEG"}},
        )
        assert len(found) == 1, found
        instances = orthanc.get(f"/series/{found[0]}/instances")
        assert len(instances) == 1
        study = orthanc.get(f"/series/{found[0]}/study")
        assert study["MainDicomTags"]["StudyInstanceUID"] == lung1_series.study_instance_uid
        raw = tmp_path / "from_orthanc.dcm"
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{orthanc.http_port}/instances/{instances[0]['ID']}/file") as r:
            raw.write_bytes(r.read())
        # Triton and ONNX Runtime give the same labels, so the SEG equals the file-mode (ONNX Runtime) output.
        _assert_seg_matches(raw, lung1_series, file_mode_label, tmp_path)
    finally:
        orthanc.stop()


def _triton_ports() -> tuple[int, int, int]:
    ports: set[int] = set()
    while len(ports) < 3:
        ports.add(free_port())
    http, grpc, metrics = sorted(ports)
    return http, grpc, metrics


@pytest.fixture
def served_default_node(tmp_path: Path, model_repository: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, int]]:
    """``dicom-node serve --config node.yaml`` as ``make run`` starts it: the repository's own node.yaml (local
    managed Triton, the bundled model repository), only ports and folders moved by environment overrides so the
    test cannot collide with anything. Without a committed model, the fixture's repository stands in."""
    node_port = free_port()
    http, grpc, metrics = _triton_ports()
    bundled = REPO / "models" / "segmentation_ct_covid_lesion_v1" / "1" / "model.onnx"
    env = {
        **os.environ,
        "DICOM_NODE__NODE__PORT": str(node_port),
        "DICOM_NODE__NODE__HOST": "127.0.0.1",
        "DICOM_NODE__STORAGE__DIR": str(tmp_path / "var"),
        "DICOM_NODE__STORAGE__MIN_FREE_BYTES": "0",
        "DICOM_NODE__SERIES__QUIET_SECONDS": "3",
        "DICOM_NODE__PUBLISH__OUTPUT_DIR": str(tmp_path / "output"),
        "DICOM_NODE__PUBLISH__PUBLISH_DIR": str(tmp_path / "publish"),
        "DICOM_NODE__INFERENCE__TRITON__URL": f"127.0.0.1:{grpc}",
        "DICOM_NODE__INFERENCE__TRITON__HTTP_PORT": str(http),
        "DICOM_NODE__INFERENCE__TRITON__METRICS_PORT": str(metrics),
        "DICOM_NODE__HTTP__PORT": str(free_port()),
    }
    if not bundled.is_file():
        env["DICOM_NODE__INFERENCE__MODEL_REPOSITORY"] = str(model_repository)
    log = tmp_path / "node.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [str(NODE_BIN), "serve", "--config", str(REPO / "node.yaml")],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        assert wait_port(node_port, 60), log.read_text()
        yield proc, tmp_path, node_port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def test_default_run_yields_seg_in_local_output(
    served_default_node: tuple[subprocess.Popen[bytes], Path, int], lung1_series: factories.WrittenSeries
) -> None:
    proc, work, port = served_default_node
    result = storescu(port, lung1_series.files)
    assert result.returncode == 0, result.stderr
    deadline = time.monotonic() + JOB_TIMEOUT_S
    segs: list[Path] = []
    while time.monotonic() < deadline and not segs:
        assert proc.poll() is None, (work / "node.log").read_text()[-3000:]
        segs = sorted((work / "var" / "results").glob("job-*/seg.dcm"))
        time.sleep(0.5)
    assert segs, (work / "node.log").read_text()[-3000:]
    ds = pydicom.dcmread(segs[0])
    assert ds.Modality == "SEG" and ds.StudyInstanceUID == lung1_series.study_instance_uid
    mask = work / "output" / f"{lung1_series.series_instance_uid}.mhd"
    assert wait_for(mask.is_file, 30), sorted((work / "output").glob("*"))
    label = sitk.ReadImage(str(mask))
    assert label.GetSize() == lung1_series.image.GetSize()
    # The Clara Render Server layout, per job, named by the series.
    name = lung1_series.series_instance_uid
    meta = work / "publish" / name / "config.meta"
    assert wait_for(meta.is_file, 30)
    assert json.loads(meta.read_text()) == {
        "density": f"{name}.mhd",
        "name": "segmentation_ct_covid_lesion_v1",
        "seg_masks": [f"{name}.output.mhd"],
        "settings": "config_render.json",
    }
    assert (work / "publish" / name / "config_render.json").is_file()
    log = (work / "node.log").read_text()
    assert "tritonserver" in log.lower() or "triton" in log.lower()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(90) == 0, log[-3000:]


def test_node_settings_of_this_module_validate(tmp_path: Path) -> None:
    """node_config() of the tests is a valid node.yaml (guards the helpers above)."""
    Settings.model_validate(node_config(tmp_path, 11112, destinations=[]))


@pytest.fixture(scope="module")
def short_series(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> factories.WrittenSeries:
    """12 real slices of lung1: enough for selection, a quick job."""
    image = factories.read_volume(shared_data / "chest_ct_volumes" / "lung1_image.nrrd")[:, :, 18:30]
    out = tmp_path_factory.mktemp("short_e2e")
    return factories.write_ct_series(image, out, transfer_syntax=JPEGLosslessSV1, tag="lung1-short-e2e")


def _job_state(node: Node, series_uid: str) -> JobState | None:
    assert node.db is not None
    jobs = [j for j in node.db.jobs() if j.series_instance_uid == series_uid]
    return jobs[0].state if jobs else None


def test_export_pending_across_node_restart_is_delivered_once(
    tmp_path: Path, short_series: factories.WrittenSeries, model_repository: Path
) -> None:
    """The destination is down when the job finishes; the node is restarted while the export is pending; once
    the destination is up the SEG arrives exactly once and the job is done."""
    pacs_port = free_port()
    dest = [{"ae_title": "STORESCP", "host": "127.0.0.1", "port": pacs_port}]
    node = _node(tmp_path, model_repository, dest)
    node.start()
    try:
        assert storescu(node.port, short_series.files).returncode == 0
        series = short_series.series_instance_uid
        assert wait_for(lambda: _job_state(node, series) is JobState.EXPORTING, JOB_TIMEOUT_S, interval=0.5)
    finally:
        node.stop(grace_s=5)
    with storescp(tmp_path / "pacs", port=pacs_port) as pacs:
        node = _node(tmp_path, model_repository, dest)  # same storage: the outbox row survives
        node.start()
        try:
            job = _finished_job(node, series)
            assert job.state is JobState.DONE, job
            assert job.attempts == 1  # inference ran once; only the send was retried
            assert len(pacs.received_files()) == 1
            assert pacs.store_requests() == 1
        finally:
            node.stop(grace_s=5)


def test_failed_export_resent_by_retry_command(
    tmp_path: Path, short_series: factories.WrittenSeries, model_repository: Path
) -> None:
    """After export.max_attempts the job fails with the reason; `dicom-node retry JOB` re-sends the SEG (no new
    inference) and the running node delivers it."""
    pacs_port = free_port()
    dest = [{"ae_title": "STORESCP", "host": "127.0.0.1", "port": pacs_port}]
    node = _node(
        tmp_path, model_repository, dest, export={"max_attempts": 1, "backoff": {"initial_s": 1.0, "max_s": 5.0}}
    )
    node.start()
    try:
        assert storescu(node.port, short_series.files).returncode == 0
        job = _finished_job(node, short_series.series_instance_uid)
        assert job.state is JobState.FAILED and job.reason.startswith("export failed"), job
        config = tmp_path / "node.yaml"
        config.write_text(node.settings.model_dump_json())  # JSON is YAML: the same settings for the CLI
        with storescp(tmp_path / "pacs", port=pacs_port) as pacs:
            r = subprocess.run(
                [str(NODE_BIN), "retry", str(job.id), "--config", str(config)], capture_output=True, text=True
            )
            assert r.returncode == 0, r.stderr
            assert "export" in r.stdout
            done = wait_for(lambda: _job_state(node, short_series.series_instance_uid) is JobState.DONE, 60)
            assert done
            assert len(pacs.received_files()) == 1
        assert node.db is not None
        assert node.db.job(job.id).attempts == 1  # type: ignore[union-attr]
        status = subprocess.run([str(NODE_BIN), "status", "--config", str(config)], capture_output=True, text=True)
        assert status.returncode == 0 and "delivered" in status.stdout, status.stdout + status.stderr
    finally:
        node.stop(grace_s=5)
