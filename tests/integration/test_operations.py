"""The node's HTTP surface against the running node: dcmtk storescu sends, ``/metrics`` counts exactly what was
sent, ``/healthz`` and ``/readyz`` answer (and say what failed), the access token guards the port, and headless
Chromium (the Debian package) renders the status page, whose DOM the test reads and whose screenshot it keeps."""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from dicom_node.daemon import Node
from dicom_node.jobs import JobState
from dicom_node.ops.http_server import preview_path
from tests import factories
from tests.dimse import SCU, free_port, settings_for, storescu, wait_for
from tests.processors import ReconstructingProcessor

pytestmark = pytest.mark.integration
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
TOKEN = "operations-test-token-0001"
SLICES = 12


@pytest.fixture(scope="module")
def small_series(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> factories.WrittenSeries:
    """12 slices of lung1, uncompressed: a short send whose every instance the metrics must count."""
    image = factories.read_volume(shared_data / "chest_ct_volumes" / "lung1_image.nrrd")
    return factories.write_ct_series(image[:, :, :SLICES], tmp_path_factory.mktemp("ops_series"), tag="ops-lung1")


@contextlib.contextmanager
def http_node(storage: Path, /, production: bool = False, **sections: Any) -> Iterator[Node]:
    """A node with its HTTP endpoints on a free loopback port; the reconstruction-only test processor unless
    ``production`` (the node's own processor, with its model backend)."""
    http = {"enabled": True, "host": "127.0.0.1", "port": free_port(), **sections.pop("http", {})}
    settings = settings_for(storage, free_port(), http=http, series={"quiet_seconds": 60, "poll_interval_s": 0.1},
                            **sections)  # fmt: skip
    node = Node(settings, processor=None if production else ReconstructingProcessor(settings))
    node.start()
    try:
        yield node
    finally:
        node.stop(grace_s=5)


def get(node: Node, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{node.http_port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as rsp:
            return rsp.status, dict(rsp.headers), rsp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def metric(node: Node, name: str, **labels: str) -> float:
    """One sample of /metrics, parsed by prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    status, headers, body = get(node, "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=")
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    raise AssertionError(f"{name}{labels} not in /metrics")


def finished_job(node: Node, series_uid: str) -> Any:
    assert node.db is not None
    db = node.db

    def done() -> Any:
        jobs = [j for j in db.jobs() if j.series_instance_uid == series_uid]
        return jobs[0] if jobs and jobs[0].state.terminal else None

    job = wait_for(done, 60)
    assert job is not None, db.jobs()
    return job


def test_metrics_count_what_storescu_sent(tmp_path: Path, small_series: factories.WrittenSeries) -> None:
    with http_node(tmp_path / "var") as node:
        assert metric(node, "dicom_node_instances_received_total") == 0
        r = storescu(node.port, small_series.files)
        assert r.returncode == 0, r.stderr
        assert metric(node, "dicom_node_instances_received_total") == SLICES
        assert metric(node, "dicom_node_store_duration_seconds_count") == SLICES
        assert metric(node, "dicom_node_associations_accepted_total", listener="plain") == 1
        sizes = sum(len(pydicom.dcmread(f).PixelData) for f in small_series.files)
        assert metric(node, "dicom_node_received_bytes_total") > sizes
        job = finished_job(node, small_series.series_instance_uid)
        assert job.state is JobState.DONE
        assert metric(node, "dicom_node_jobs", state="done") == 1
        assert metric(node, "dicom_node_series_completed_total") == 1
        assert metric(node, "dicom_node_job_outcomes_total", outcome="done") == 1
        assert metric(node, "dicom_node_queue_depth", queue="jobs") == 0
        assert metric(node, "dicom_node_storage_free_bytes") > 0

        # One refused instance (its Series UID is no UID): counted by reason, the received count unchanged.
        ds = pydicom.dcmread(small_series.files[0])
        ds.SeriesInstanceUID = "not-a-uid"
        scu = SCU(node.port, transfer_syntaxes=[ds.file_meta.TransferSyntaxUID])
        assert scu.send(ds) == 0xA900
        scu.release()
        assert metric(node, "dicom_node_instances_refused_total", reason="invalid_dataset") == 1
        assert metric(node, "dicom_node_instances_received_total") == SLICES

        status, _, body = get(node, "/healthz")
        assert status == 200 and json.loads(body)["alive"] is True
        status, _, body = get(node, "/readyz")
        ready = json.loads(body)
        assert status == 200 and ready["ready"] is True and ready["failed"] == [], ready
        assert set(ready["checks"]) == {"scp", "database", "storage", "backend"}
        assert f"port {node.port}" in ready["checks"]["scp"]["detail"]


def test_readyz_says_what_failed(tmp_path: Path) -> None:
    # Less free space than storage.min_free_bytes: the SCP refuses every instance, so the node is not ready.
    with http_node(tmp_path / "full", storage={"min_free_bytes": 2**62}) as node:
        status, _, body = get(node, "/readyz")
        ready = json.loads(body)
        assert status == 503 and ready["failed"] == ["storage"], ready
        assert "below storage.min_free_bytes" in ready["checks"]["storage"]["detail"]
        assert ready["checks"]["database"]["detail"].endswith("writable")

    # The node's own processor, pointed at a Triton that is not there (a closed port, managed: false): the real
    # client finds it unreachable, and the backend check names the URL.
    closed = free_port()
    with http_node(
        tmp_path / "no-triton",
        production=True,
        inference={"backend": "triton", "triton": {"url": f"127.0.0.1:{closed}", "managed": False}},
        reconstruction={"predecode_cache_mb": 0},
    ) as node:

        def tried() -> Any:  # the first open runs in the background at start
            r = json.loads(get(node, "/readyz")[2])
            return r if "unavailable" in r["checks"]["backend"]["detail"] else None

        ready = wait_for(tried, 20)
        assert ready is not None and ready["failed"] == ["backend"], ready
        assert f"127.0.0.1:{closed}" in ready["checks"]["backend"]["detail"]
        assert get(node, "/readyz")[0] == 503
        assert metric(node, "dicom_node_backend_ready") == 0
        assert get(node, "/healthz")[0] == 200  # alive all the same: nothing to restart for
        assert node.scp is not None
        node.scp.stop_accepting()  # as at the start of a shutdown
        ready = json.loads(get(node, "/readyz")[2])
        assert ready["failed"] == ["scp", "backend"], ready


def test_an_access_token_guards_every_endpoint(tmp_path: Path) -> None:
    # Beyond loopback (all interfaces) only with a token; the test reaches it on 127.0.0.1.
    with http_node(tmp_path / "var", http={"host": "0.0.0.0", "access_token": TOKEN}) as node:
        for path in ("/", "/healthz", "/readyz", "/metrics", "/jobs/1/preview.png"):
            status, headers, _ = get(node, path)
            assert status == 401, path
            assert headers["WWW-Authenticate"].startswith("Basic realm=")
        assert get(node, "/healthz", {"Authorization": "Bearer wrong-token-wrong-token"})[0] == 401
        assert get(node, "/healthz", {"Authorization": f"Bearer {TOKEN}"})[0] == 200
        basic = base64.b64encode(f"radiology:{TOKEN}".encode()).decode()
        status, headers, body = get(node, "/", {"Authorization": f"Basic {basic}"})
        assert status == 200 and b"dicom-node" in body
        assert "script-src" not in headers["Content-Security-Policy"]  # default-src 'none': no script at all


def _chromium(*args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", *args],
        # Its messages hold UTF-8 (·); SimpleITK's DICOM I/O (GDCM), run by an earlier test in this process,
        # leaves the C locale, under which text=True would decode them as ASCII.
        capture_output=True, encoding="utf-8", errors="replace", timeout=90,
    )  # fmt: skip


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian package chromium)")
def test_status_page_in_headless_chromium(tmp_path: Path, small_series: factories.WrittenSeries) -> None:
    with http_node(tmp_path / "var") as node:
        r = storescu(node.port, small_series.files)
        assert r.returncode == 0, r.stderr
        job = finished_job(node, small_series.series_instance_uid)
        # What the outputs stage writes beside the SEG: the page shows it when the file exists.
        preview = preview_path(node.storage / "results", job.id)
        preview.parent.mkdir(parents=True, exist_ok=True)
        ramp = np.tile(np.arange(0, 256, 2, dtype=np.uint8), (64, 1))
        sitk.WriteImage(sitk.GetImageFromArray(ramp), str(preview))
        # A refusal quoting what a sender wrote, markup included: shown as text.
        ds = pydicom.dcmread(small_series.files[0])
        ds.SeriesInstanceUID = "<script>x</script>"
        scu = SCU(node.port, transfer_syntaxes=[ds.file_meta.TransferSyntaxUID])
        assert scu.send(ds) == 0xA900
        scu.release()

        url = f"http://127.0.0.1:{node.http_port}/"
        dom = _chromium("--dump-dom", url)
        assert dom.returncode == 0, dom.stderr[-2000:]
        html = dom.stdout
        assert f'<tr data-job-id="{job.id}" data-state="done">' in html
        assert f'src="/jobs/{job.id}/preview.png"' in html
        assert f'data-series-uid="{small_series.series_instance_uid}"' in html
        assert f'<td class="instances">{SLICES}</td>' in html
        assert 'data-kind="instance_refused"' in html and "&lt;script&gt;x&lt;/script&gt;" in html
        assert "<script" not in html
        assert 'id="readiness" data-ready="true"' in html
        # The image the page links is the file, byte for byte.
        status, headers, body = get(node, f"/jobs/{job.id}/preview.png")
        assert status == 200 and headers["Content-Type"] == "image/png" and body == preview.read_bytes()

        shot = tmp_path / "status-page.png"
        r2 = _chromium(f"--screenshot={shot}", "--window-size=1280,900", "--hide-scrollbars", url)
        assert r2.returncode == 0 and shot.is_file(), r2.stderr[-2000:]
        image = sitk.ReadImage(str(shot))
        assert image.GetSize()[:2] == (1280, 900)
        pixels = sitk.GetArrayFromImage(image)
        assert pixels.std() > 10  # something was drawn, not a blank page
