"""The receiving node against real dcmtk tools: storescu/echoscu started by the tests, the node in-process
(or as a ``dicom-node serve`` subprocess where it must die: kill -9, SIGTERM)."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1

from dicom_node.daemon import Node
from dicom_node.jobs import JobState
from tests import factories
from tests.dimse import (
    SCU,
    echoscu,
    free_port,
    node_config,
    storescu,
    wait_for,
    wait_port,
    write_config,
)
from tests.processors import ReconstructingProcessor, running_node

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
NODE_BIN = REPO / ".venv" / "bin" / "dicom-node"


@pytest.fixture(scope="module")
def lung1_series(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> factories.WrittenSeries:
    out = tmp_path_factory.mktemp("lung1_jpll")
    image = factories.read_volume(shared_data / "chest_ct_volumes" / "lung1_image.nrrd")
    return factories.write_ct_series(image, out, transfer_syntax=JPEGLosslessSV1, shuffle=True, tag="lung1-recv")


def jobs_of(node: Node, series_uid: str) -> list[Any]:
    assert node.db is not None
    return [j for j in node.db.jobs() if j.series_instance_uid == series_uid]


def terminal_job(node: Node, series_uid: str, timeout: float = 60) -> Any:
    def done() -> Any:
        jobs = jobs_of(node, series_uid)
        return jobs if jobs and all(j.state.terminal for j in jobs) else None

    jobs = wait_for(done, timeout)
    assert jobs, f"no terminal job for {series_uid}: {jobs_of(node, series_uid)}"
    assert len(jobs) == 1, jobs
    return jobs[0]


def events(node: Node, kind: str | None = None) -> list[sqlite3.Row]:
    assert node.db is not None
    if kind is None:
        return node.db.query("SELECT * FROM events ORDER BY id")
    return node.db.query("SELECT * FROM events WHERE kind=? ORDER BY id", (kind,))


def instance_count(node: Node, series_uid: str) -> int:
    assert node.db is not None
    return int(node.db.query("SELECT count(*) AS n FROM instances WHERE series_instance_uid=?", (series_uid,))[0]["n"])


def assert_volume_equal(volume: Any, expected: sitk.Image) -> None:
    got = volume.image
    assert got.GetSize() == expected.GetSize()
    np.testing.assert_allclose(got.GetSpacing(), expected.GetSpacing(), atol=1e-3)
    np.testing.assert_allclose(got.GetOrigin(), expected.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(got.GetDirection(), expected.GetDirection(), atol=1e-5)
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(got).astype(np.float32), sitk.GetArrayFromImage(expected).astype(np.float32)
    )


# -- acceptance: real series ----------------------------------------------------------------------------------
def test_lung1_jpeg_lossless_shuffled_becomes_one_job(tmp_path: Path, lung1_series: factories.WrittenSeries) -> None:
    # quiet_seconds is long: completion must come from the release + regular-stack rule.
    with running_node(tmp_path / "var", series={"quiet_seconds": 120}) as node:
        r = storescu(node.port, lung1_series.files, propose="-xs")
        assert r.returncode == 0, r.stderr
        job = terminal_job(node, lung1_series.series_instance_uid, timeout=90)
        assert job.state is JobState.DONE, job
        assert job.attempts == 1
        assert instance_count(node, lung1_series.series_instance_uid) == len(lung1_series.files)
        assert node.db is not None
        jobrow = node.db.query("SELECT reason FROM jobs WHERE id=?", (job.id,))
        assert jobrow
        # Bytes as received: the spool file's dataset is the sender's file's dataset, byte for byte.
        src = lung1_series.files[0]
        stored = node.spool.path_for(  # type: ignore[union-attr]
            lung1_series.study_instance_uid, lung1_series.series_instance_uid, src.stem
        )
        a, b = pydicom.dcmread(src), pydicom.dcmread(stored)
        assert a.PixelData == b.PixelData and b.file_meta.TransferSyntaxUID == JPEGLosslessSV1
        proc = node.processor
        assert isinstance(proc, ReconstructingProcessor)
        assert_volume_equal(proc.volumes[job.id], lung1_series.image)
        assert echoscu(node.port)


def test_siemens_j2k_series_becomes_one_job(tmp_path: Path, shared_data: Path) -> None:
    series = factories.fill_missing_uids(shared_data / "ct_siemens_j2k_20slices", tmp_path / "j2k")
    with running_node(tmp_path / "var", series={"quiet_seconds": 120}) as node:
        r = storescu(node.port, series.files, propose="-xv")
        assert r.returncode == 0, r.stderr
        job = terminal_job(node, series.series_instance_uid, timeout=90)
        assert job.state is JobState.DONE, job
        assert instance_count(node, series.series_instance_uid) == 20
        assert node.db is not None
        ts = {r["transfer_syntax_uid"] for r in node.db.query("SELECT transfer_syntax_uid FROM instances")}
        assert ts == {JPEG2000Lossless}
        proc = node.processor
        assert isinstance(proc, ReconstructingProcessor)
        # The factory reads its files in name order; the volume is sorted along the slice normal, so compare
        # with the files sorted by position (GDCM's series sort).
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(tmp_path / "j2k")))
        assert_volume_equal(proc.volumes[job.id], reader.Execute())


# -- negative cases: each ends in a recorded reason, the node still serving ------------------------------------
def test_unknown_calling_ae_is_rejected(tmp_path: Path, lung1_series: factories.WrittenSeries) -> None:
    with running_node(tmp_path / "var", node={"allowed_calling_ae_titles": ["PACS", "ECHOSCU"]}) as node:
        r = storescu(node.port, lung1_series.files[:1], aet="INTRUDER")
        assert r.returncode != 0
        ev = events(node, "association_rejected")
        assert ev and "INTRUDER" in ev[-1]["reason"] and "allowed_calling_ae_titles" in ev[-1]["reason"]
        assert instance_count(node, lung1_series.series_instance_uid) == 0
        assert echoscu(node.port, aet="ECHOSCU")
        r = storescu(node.port, lung1_series.files[:1], aet="PACS")
        assert r.returncode == 0, r.stderr


def test_non_ct_refused_at_negotiation_or_skipped(tmp_path: Path, shared_data: Path) -> None:
    volume = factories.read_volume(shared_data / "chest_ct_volumes" / "lung2_image.nrrd")
    mr = factories.write_ct_series(volume[:, :, :10], tmp_path / "mr", modality="MR", tag="mr-as-ct")
    with running_node(tmp_path / "var", series={"quiet_seconds": 1}) as node:
        # A SEG (non-CT SOP class): refused at negotiation, the reason recorded.
        seg = shared_data / "seg_reference" / "dcmqi_ct3slice" / "liver.dcm"
        r = storescu(node.port, [seg], propose="-xe")
        assert r.returncode != 0
        ev = events(node, "context_refused")
        assert ev and "1.2.840.10008.5.1.4.1.1.66.4" in ev[-1]["reason"]
        assert echoscu(node.port)
        # A series that says MR: stored, then skipped by selection with the reason.
        r = storescu(node.port, mr.files, propose="-xe")
        assert r.returncode == 0, r.stderr
        job = terminal_job(node, mr.series_instance_uid)
        assert job.state is JobState.SKIPPED
        assert "MR" in (job.reason or "")
        assert echoscu(node.port)


def test_other_sop_classes_accepted_and_ignored_when_configured(tmp_path: Path, shared_data: Path) -> None:
    seg = shared_data / "seg_reference" / "dcmqi_ct3slice" / "liver.dcm"
    with running_node(tmp_path / "var", node={"accept_other_sop_classes": True}) as node:
        r = storescu(node.port, [seg], propose="-xe")
        assert r.returncode == 0, r.stderr
        assert node.db is not None
        assert node.db.query("SELECT count(*) AS n FROM instances")[0]["n"] == 0


def test_bad_objects_refused_with_reason(tmp_path: Path, shared_data: Path) -> None:
    storage = tmp_path / "var"
    raw_j2k = sorted((shared_data / "ct_siemens_j2k_20slices").iterdir())[:2]
    with running_node(storage) as node:
        # 1. Empty Study/Series UIDs (the raw Siemens files; SOP class/instance only in the command).
        scu = SCU(node.port)
        statuses = [scu.send(p) for p in raw_j2k]
        scu.release()
        assert all(s == 0xA900 for s in statuses), [hex(s) for s in statuses]
        ev = events(node, "instance_refused")
        assert "StudyInstanceUID is empty" in ev[-1]["reason"]
        assert ev[-1]["path"] and Path(ev[-1]["path"]).is_file()  # quarantined
        assert echoscu(node.port)

        # 2. The malformed object (bad sequence, non-UID SOP Instance UID) sent by dcmtk.
        r = storescu(node.port, [shared_data / "codecs" / "bad_sequence.dcm"], propose="-xs")
        assert "0xa900" in (r.stdout + r.stderr).lower() or r.returncode != 0
        assert "not a valid UID" in events(node, "instance_refused")[-1]["reason"]
        assert echoscu(node.port)

        # 3. A dataset that cannot be parsed (an element whose length runs past the end).
        good = factories.write_ct_series(
            factories.read_volume(shared_data / "chest_ct_volumes" / "lung1_image.nrrd")[:, :, :1],
            tmp_path / "one", tag="truncated",
        )  # fmt: skip
        broken = tmp_path / "broken.dcm"
        data = good.files[0].read_bytes()
        idx = data.index(b"\x10\x00\x10\x00PN")  # PatientName: claim a huge length
        broken.write_bytes(data[: idx + 6] + b"\xff\x7f" + data[idx + 8 : idx + 200])
        scu = SCU(node.port)
        status = scu.send(broken)
        scu.release()
        assert 0xA900 <= status <= 0xCFFF, hex(status)
        assert "cannot be parsed" in events(node, "instance_refused")[-1]["reason"]
        assert echoscu(node.port)

        # 4. UIDs built to escape the spool.
        ds = pydicom.dcmread(good.files[0])
        ds.SeriesInstanceUID = "../../etc"
        ds.StudyInstanceUID = "/tmp/evil"
        scu = SCU(node.port, transfer_syntaxes=[ds.file_meta.TransferSyntaxUID])
        assert scu.send(ds) == 0xA900
        scu.release()
        assert "not a valid UID" in events(node, "instance_refused")[-1]["reason"]
        assert not (storage.parent / "etc").exists() and not Path("/tmp/evil").exists()
        for dirpath, _dirs, files in os.walk(storage):
            for name in files:
                p = Path(dirpath, name).resolve()
                assert (
                    p.parent == storage.resolve()
                    or p.is_relative_to((storage / "spool").resolve())
                    or (p.is_relative_to((storage / "quarantine").resolve()))
                ), p

        # 5. Valid UIDs, Pixel Data of length 0 (issue 16, F4): refused at C-STORE, never a job failing later.
        ds = pydicom.dcmread(good.files[0])
        ds.PixelData = b""
        scu = SCU(node.port, transfer_syntaxes=[ds.file_meta.TransferSyntaxUID])
        assert scu.send(ds) == 0xA900
        scu.release()
        assert "Pixel Data (7FE0,0010) is empty" in events(node, "instance_refused")[-1]["reason"]
        assert node.db is not None
        assert node.db.query("SELECT count(*) AS n FROM instances")[0]["n"] == 0
        assert not node.db.jobs()
        assert echoscu(node.port)


def test_abort_mid_transfer_keeps_acknowledged(tmp_path: Path, lung1_series: factories.WrittenSeries) -> None:
    with running_node(tmp_path / "var", series={"quiet_seconds": 1.5}) as node:
        scu = SCU(node.port)
        statuses = [scu.send(p) for p in lung1_series.files[:7]]
        scu.abort()
        assert statuses == [0] * 7
        job = terminal_job(node, lung1_series.series_instance_uid)
        assert instance_count(node, lung1_series.series_instance_uid) == 7
        assert job.state in (JobState.DONE, JobState.SKIPPED, JobState.FAILED)
        assert "quiet" in (node.db.query("SELECT reason FROM jobs") and "quiet") if node.db else True
        assert echoscu(node.port)


def test_duplicate_replaces_and_rerun(tmp_path: Path, lung1_series: factories.WrittenSeries) -> None:
    with running_node(tmp_path / "var", series={"quiet_seconds": 1}) as node:
        files = lung1_series.files[:5]
        assert storescu(node.port, files).returncode == 0
        assert storescu(node.port, files[:2]).returncode == 0  # same SOP Instance UIDs again, same run
        assert instance_count(node, lung1_series.series_instance_uid) == 5
        first = terminal_job(node, lung1_series.series_instance_uid)
        assert first.run == 1
        # Arriving after the series was processed: a new run (policy rerun), still 5 distinct instances.
        assert storescu(node.port, files[:1]).returncode == 0
        assert instance_count(node, lung1_series.series_instance_uid) == 5

        def two_runs() -> Any:
            jobs = jobs_of(node, lung1_series.series_instance_uid)
            return jobs if len(jobs) == 2 and all(j.state.terminal for j in jobs) else None

        jobs = wait_for(two_runs, 20)
        assert jobs and [j.run for j in jobs] == [1, 2]
        spool_files = list(node.spool.iter_files())  # type: ignore[union-attr]
        assert len(spool_files) == 5


def test_disk_nearly_full_answers_out_of_resources(tmp_path: Path, lung1_series: factories.WrittenSeries) -> None:
    with running_node(tmp_path / "var", storage={"min_free_bytes": 10**18}) as node:
        scu = SCU(node.port)
        status = scu.send(lung1_series.files[0])
        scu.release()
        assert status == 0xA700
        ev = events(node, "instance_refused")
        assert ev and "min_free_bytes" in ev[-1]["reason"] and ev[-1]["status"] == 0xA700
        assert echoscu(node.port)


def test_reconstruction_rejections_recorded_on_job(tmp_path: Path, shared_data: Path) -> None:
    with running_node(
        tmp_path / "var",
        series={"quiet_seconds": 1},
        selection={"min_slices": 1, "axial_tolerance_deg": 90, "image_type": []},
        reconstruction={"gantry_tilt": "reject"},
    ) as node:
        tilt = sorted((shared_data / "ct_gantry_tilt_head").iterdir())
        assert storescu(node.port, tilt, propose="-xe").returncode == 0
        series_uid = str(pydicom.dcmread(tilt[0], stop_before_pixels=True).SeriesInstanceUID)
        job = terminal_job(node, series_uid)
        assert job.state in (JobState.FAILED, JobState.SKIPPED) and job.reason, job
        rle = shared_data / "codecs" / "orthanc_ELSCINT1_PMSCT_RLE1_private.dcm"
        scu = SCU(node.port)  # dcmtk's storescu will not read this file; send its bytes as they are
        assert scu.send(rle) == 0
        scu.release()
        series_uid = str(pydicom.dcmread(rle, stop_before_pixels=True).SeriesInstanceUID)
        job = terminal_job(node, series_uid)
        assert job.state in (JobState.FAILED, JobState.SKIPPED) and job.reason, job
        assert echoscu(node.port)


# -- the node as a process: kill -9 and SIGTERM -----------------------------------------------------------------
def _serve(config: Path, log: Path) -> subprocess.Popen[bytes]:
    exe = [str(NODE_BIN)] if NODE_BIN.exists() else [sys.executable, "-m", "dicom_node.cli"]
    return subprocess.Popen([*exe, "serve", "--config", str(config)], stdout=log.open("ab"), stderr=subprocess.STDOUT)


def test_kill9_mid_series_loses_nothing_acknowledged(
    tmp_path: Path, lung1_series: factories.WrittenSeries, model_repository: Path
) -> None:
    port = free_port()
    storage = tmp_path / "var"
    cfg = write_config(
        tmp_path / "node.yaml",
        node_config(storage, port, series={"quiet_seconds": 2}, inference={"model_repository": str(model_repository)}),
    )
    log = tmp_path / "node.log"
    proc = _serve(cfg, log)
    try:
        assert wait_port(port), log.read_text()
        acked: list[str] = []
        errors: list[str] = []
        half = threading.Event()

        def sender() -> None:
            try:
                scu = SCU(port)
                for i, path in enumerate(lung1_series.files):
                    if scu.send(path) == 0:
                        acked.append(path.stem)
                    if i == 15:
                        half.set()
                scu.release()
            except Exception as exc:  # the node dies under us
                errors.append(repr(exc))
            finally:
                half.set()

        t = threading.Thread(target=sender)
        t.start()
        assert half.wait(60)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        t.join(60)
        assert 16 <= len(acked) < len(lung1_series.files), (len(acked), errors)
        # Restart, resend nothing.
        proc = _serve(cfg, log)
        assert wait_port(port), log.read_text()
        db = sqlite3.connect(storage / "state.sqlite3")

        def finished() -> Any:
            rows = db.execute("SELECT id, state, attempts FROM jobs").fetchall()
            return rows if rows and all(r[1] in ("done", "skipped", "failed") for r in rows) else None

        jobs = wait_for(finished, 180)  # the restarted node runs the whole pipeline (ONNX Runtime) once
        assert jobs and len(jobs) == 1 and jobs[0][1] == "done" and jobs[0][2] == 1, (jobs, log.read_text()[-3000:])
        stored = {r[0] for r in db.execute("SELECT sop_instance_uid FROM instances")}
        assert set(acked) <= stored
        db.close()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


def test_sigterm_exits_zero_with_state_persisted(tmp_path: Path, lung1_series: factories.WrittenSeries) -> None:
    port = free_port()
    storage = tmp_path / "var"
    cfg = write_config(tmp_path / "node.yaml", node_config(storage, port, series={"quiet_seconds": 60}))
    log = tmp_path / "node.log"
    proc = _serve(cfg, log)
    try:
        assert wait_port(port), log.read_text()
        scu = SCU(port)
        assert [scu.send(p) for p in lung1_series.files[:5]] == [0] * 5
        # Association still open: SIGTERM must let it finish, then exit 0.
        proc.send_signal(signal.SIGTERM)
        assert scu.send(lung1_series.files[5]) == 0
        scu.release()
        assert proc.wait(30) == 0, log.read_text()[-3000:]
        db = sqlite3.connect(storage / "state.sqlite3")
        assert db.execute("SELECT count(*) FROM instances").fetchone()[0] == 6
        assert db.execute("SELECT state FROM jobs").fetchall() == [("received",)]
        db.close()
        # Status works on the persisted state.
        r = subprocess.run(
            [str(NODE_BIN), "status", "--config", str(cfg), "--json"], capture_output=True, text=True, timeout=60
        )
        assert r.returncode == 0, r.stderr
        assert '"received"' in r.stdout
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
