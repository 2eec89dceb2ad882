"""C-STORE SCU and the persistent outbox against real peers: dcmtk storescp, Orthanc, pynetdicom SCPs answering
chosen statuses."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from pathlib import Path

import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_node.export.outbox import JobExportOutcome, Outbox, list_exports, retry_failed_for_job
from dicom_node.export.scu import send
from dicom_node.export.seg_writer import write_seg
from dicom_node.settings import BackoffPolicy, Destination, ExportSection, SegSection, Settings, StorageSection
from dicom_node.types import DicomArtifact, SegArtifact, SendStatus
from inference.spec import SegmentSpec
from tests.dicom_peers import Orthanc, StatusSCP, StoreSCP, free_port, orthanc_binary, storescp, storescu
from tests.factories import WrittenSeries, read_volume, write_ct_series
from tests.seg_helpers import dciodvfy_errors, have_dciodvfy, volume_of_series

pytestmark = pytest.mark.integration

FAST = ExportSection(max_attempts=3, backoff=BackoffPolicy(initial_s=0.2, max_s=0.5), timeout_s=10, workers=2)


@pytest.fixture(scope="module")
def series_and_seg(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[WrittenSeries, SegArtifact]:
    d = shared_data / "chest_ct_volumes"
    base = tmp_path_factory.mktemp("export")
    ws = write_ct_series(read_volume(d / "lung1_image.nrrd"), base / "series", tag="export-lung1")
    label = sitk.Cast(sitk.ReadImage(str(d / "lung1_label.nrrd")) > 0, sitk.sitkUInt8)
    label.CopyInformation(ws.image)
    art = write_seg(
        volume_of_series(ws), label, segments=(SegmentSpec(1, "Ground glass opacity"),),
        algorithm_name="segmentation_ct_covid_lesion_v1", algorithm_version="1", seg=SegSection(),
        out_path=base / "outbox" / "seg.dcm",
    )  # fmt: skip
    return ws, art


class Settled:
    """Collects the outbox's job callbacks."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, JobExportOutcome]] = []
        self.event = threading.Event()

    def __call__(self, job_id: int, outcome: JobExportOutcome) -> None:
        self.calls.append((job_id, outcome))
        self.event.set()

    def wait(self, timeout: float) -> JobExportOutcome:
        assert self.event.wait(timeout), "job never settled"
        self.event.clear()
        return self.calls[-1][1]


def _dest(port: int, ae: str = "STORESCP") -> Destination:
    return Destination(ae_title=ae, host="127.0.0.1", port=port)


def _outbox(tmp_path: Path, export: ExportSection, dests: list[Destination], settled: Settled | None) -> Outbox:
    return Outbox(
        tmp_path / "state" / "state.sqlite3", export, calling_ae_title="COVIDSEG", destinations=dests,
        on_job_settled=settled,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------- SCU


def test_send_to_storescp_arrives_explicit_and_valid(series_and_seg, tmp_path: Path) -> None:
    ws, art = series_and_seg
    with storescp(tmp_path / "in") as scp:
        result = send(art.path, _dest(scp.port), "COVIDSEG", 10)
        assert result.status == SendStatus.SUCCESS, result
        files = scp.received_files()
    assert len(files) == 1
    received = pydicom.dcmread(files[0])
    assert received.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert received.SOPInstanceUID == art.sop_instance_uid
    assert received.StudyInstanceUID == ws.study_instance_uid
    refs = {r.ReferencedSOPInstanceUID for s in received.ReferencedSeriesSequence for r in s.ReferencedInstanceSequence}
    assert refs == set(ws.sop_instance_uids)
    if have_dciodvfy():
        assert dciodvfy_errors(files[0], tmp_path) == []


def test_send_connection_refused_is_retry(series_and_seg) -> None:
    _, art = series_and_seg
    result = send(art.path, _dest(free_port()), "COVIDSEG", 5)
    assert result.status == SendStatus.RETRY and result.dimse_status is None
    assert "connection" in result.reason


@pytest.mark.parametrize(
    ("status", "expected"),
    [(0xB000, SendStatus.WARNING), (0xA700, SendStatus.RETRY), (0xA900, SendStatus.FAILED), (0xC001, SendStatus.RETRY)],
)
def test_send_maps_dimse_status(series_and_seg, status: int, expected: SendStatus) -> None:
    _, art = series_and_seg
    scp = StatusSCP(status).start()
    try:
        result = send(art.path, _dest(scp.port, scp.ae_title), "COVIDSEG", 10)
    finally:
        scp.stop()
    assert result.status == expected and result.dimse_status == status, result


# ------------------------------------------------------------------------------------------------- outbox


def test_outbox_delivers_to_two_destinations_and_logs(series_and_seg, tmp_path: Path, caplog) -> None:
    _, art = series_and_seg
    settled = Settled()
    caplog.set_level(logging.INFO, logger="dicom_node.export")
    with storescp(tmp_path / "a") as a, storescp(tmp_path / "b") as b:
        box = _outbox(tmp_path, FAST, [_dest(a.port), _dest(b.port)], settled)
        with box:
            box.enqueue(7, art)
            outcome = settled.wait(30)
        assert outcome.state == "delivered" and outcome.job_id == 7
        assert [r.state for r in outcome.rows] == ["delivered", "delivered"]
        assert a.store_requests() == 1 and b.store_requests() == 1
    attempts = [r for r in caplog.records if getattr(r, "event", None) == "export_attempt"]
    assert len(attempts) == 2
    for rec in attempts:
        assert rec.sop_instance_uid == art.sop_instance_uid  # type: ignore[attr-defined]
        assert rec.study_instance_uid == art.study_instance_uid  # type: ignore[attr-defined]
        assert rec.outcome == "delivered"  # type: ignore[attr-defined]


def _copies(art: SegArtifact, n: int, out: Path) -> list[DicomArtifact]:
    """``n`` more objects of the SEG's series: the SEG file under new SOP Instance UIDs (as overlay images are:
    one series, one object each)."""
    out.mkdir(parents=True, exist_ok=True)
    copies = []
    for i in range(n):
        ds = pydicom.dcmread(art.path)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 2
        path = out / f"copy{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        copies.append(
            DicomArtifact(
                "overlay",
                path,
                str(ds.SOPClassUID),
                str(ds.SOPInstanceUID),
                art.series_instance_uid,
                art.study_instance_uid,
            )
        )
    return copies


def test_a_jobs_objects_go_over_one_association(series_and_seg, tmp_path: Path) -> None:
    """The SEG and ten more objects of one job: one association to storescp carries all eleven, in queue order."""
    _, art = series_and_seg
    copies = _copies(art, 10, tmp_path / "copies")
    settled = Settled()
    with storescp(tmp_path / "a") as a:
        with _outbox(tmp_path, FAST, [_dest(a.port)], settled) as box:
            box.enqueue(8, art, *copies)
            outcome = settled.wait(30)
        assert outcome.state == "delivered"
        assert [r.attempts for r in outcome.rows] == [1] * 11
        assert a.store_requests() == 11 and a.associations() == 1
        received = {pydicom.dcmread(p).SOPInstanceUID for p in a.received_files()}
    assert received == {art.sop_instance_uid} | {c.sop_instance_uid for c in copies}


def test_an_association_lost_mid_batch_spends_no_attempt_of_the_objects_behind(series_and_seg, tmp_path: Path) -> None:
    """The peer aborts the association on the third object: the first two are delivered, the third has spent an
    attempt, the ones behind it were never tried and go back with theirs; the next association delivers them."""
    _, art = series_and_seg
    copies = _copies(art, 5, tmp_path / "copies")
    settled = Settled()
    scp = StatusSCP(0x0000, abort_on=3).start()
    try:
        with _outbox(tmp_path, FAST, [_dest(scp.port, scp.ae_title)], settled) as box:
            box.enqueue(12, art, *copies)
            outcome = settled.wait(30)
    finally:
        scp.stop()
    assert outcome.state == "delivered"
    assert [r.attempts for r in outcome.rows] == [1, 1, 2, 1, 1, 1]
    assert scp.associations == 2
    assert sorted(scp.received) == sorted([art.sop_instance_uid] + [c.sop_instance_uid for c in copies])


def test_warning_status_is_recorded_as_warning(series_and_seg, tmp_path: Path) -> None:
    _, art = series_and_seg
    settled = Settled()
    scp = StatusSCP(0xB000).start()
    try:
        with _outbox(tmp_path, FAST, [_dest(scp.port, scp.ae_title)], settled) as box:
            box.enqueue(1, art)
            outcome = settled.wait(30)
    finally:
        scp.stop()
    assert outcome.state == "delivered"
    (row,) = outcome.rows
    assert row.state == "warning" and row.dimse_status == 0xB000 and "0xB000" in (row.reason or "")
    assert outcome.warnings == (row,)
    assert len(scp.received) == 1


def test_down_destination_does_not_block_another(series_and_seg, tmp_path: Path) -> None:
    """One destination swallows nothing (refused), one is up: the up one is delivered at once."""
    _, art = series_and_seg
    export = ExportSection(max_attempts=50, backoff=BackoffPolicy(initial_s=0.2, max_s=0.5), timeout_s=10, workers=1)
    with storescp(tmp_path / "up") as up:
        box = _outbox(tmp_path, export, [_dest(free_port(), "DOWN"), _dest(up.port)], None)
        with box:
            box.enqueue(3, art)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                states = {r.destination.split("@")[0]: r.state for r in box.rows(3)}
                if states.get("STORESCP") == "delivered":
                    break
                time.sleep(0.05)
            assert states["STORESCP"] == "delivered"
            assert states["DOWN"] in ("pending", "sending")
            assert box.outcome(3) is None  # not done while a destination has not accepted


def test_max_attempts_then_retry_delivers(series_and_seg, tmp_path: Path) -> None:
    _, art = series_and_seg
    settled = Settled()
    port = free_port()
    box = _outbox(tmp_path, FAST, [_dest(port)], settled)
    with box:
        box.enqueue(5, art)
        outcome = settled.wait(30)
        assert outcome.state == "failed"
        (row,) = outcome.rows
        assert row.state == "failed" and row.attempts == FAST.max_attempts
        assert "gave up after 3 attempt(s)" in (row.reason or "") and "connection" in (row.reason or "")
        with storescp(tmp_path / "in", port=port) as scp:
            settings = Settings(storage=StorageSection(dir=tmp_path / "state"))
            assert [r["state"] for r in list_exports(settings)] == ["failed"]
            assert retry_failed_for_job(settings, 5) == 1  # as `dicom-node retry 5` does, from another connection
            outcome = settled.wait(30)
            assert outcome.state == "delivered"
            assert scp.store_requests() == 1
    assert [c[1].state for c in settled.calls] == ["failed", "delivered"]


def test_restart_while_pending_delivers_after_restart(series_and_seg, tmp_path: Path) -> None:
    _, art = series_and_seg
    port = free_port()
    slow = ExportSection(max_attempts=10, backoff=BackoffPolicy(initial_s=60, max_s=60), timeout_s=10, workers=2)
    first = _outbox(tmp_path, slow, [_dest(port)], None)
    with first:
        first.enqueue(9, art)
        deadline = time.monotonic() + 10
        while not (first.rows(9)[0].attempts == 1 and first.rows(9)[0].state == "pending"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert first.rows(9)[0].state == "pending"  # failed once, next attempt a minute away
    # a crash mid-send leaves the row in 'sending'
    conn = sqlite3.connect(first.db_path)
    with conn:
        conn.execute("UPDATE outbox SET state='sending', next_attempt_at=next_attempt_at WHERE job_id=9")
    conn.close()
    settled = Settled()
    with storescp(tmp_path / "in", port=port) as scp:
        second = _outbox(tmp_path, slow, [_dest(port)], settled)
        with second:
            # sending -> pending at start, but its next attempt is still the backoff away: make it due now,
            # as a restart after that minute would find it
            with contextlib.closing(sqlite3.connect(second.db_path)) as c, c:
                c.execute("UPDATE outbox SET next_attempt_at=0 WHERE job_id=9")
            second._notify()
            outcome = settled.wait(30)
        assert outcome.state == "delivered"
        assert scp.store_requests() == 1 and len(scp.received_files()) == 1


def test_a_destination_removed_from_the_configuration_is_failed_by_name_not_sent(
    series_and_seg, tmp_path: Path
) -> None:
    """Rows queued for a PACS that a restart's configuration no longer lists are failed, naming it, and nothing
    reaches it (the row holds no TLS settings, and the hospital took that PACS out); `retry` after the
    destination is back in the configuration delivers them."""
    _, art = series_and_seg
    with storescp(tmp_path / "old") as old_pacs, storescp(tmp_path / "new") as new_pacs:
        old_dest, new_dest = _dest(old_pacs.port, "OLDPACS"), _dest(new_pacs.port, "NEWPACS")
        first = _outbox(tmp_path, FAST, [old_dest], None)
        first.enqueue(11, art)  # queued, not started: the node stopped before sending
        first.stop()
        settled = Settled()
        with _outbox(tmp_path, FAST, [new_dest], settled):  # restarted with OLDPACS taken out
            outcome = settled.wait(30)
        assert outcome.state == "failed"
        (row,) = outcome.rows
        assert row.state == "failed" and row.attempts == 1
        assert f"OLDPACS@127.0.0.1:{old_pacs.port} is no longer configured" in (row.reason or "")
        assert old_pacs.store_requests() == 0 and new_pacs.store_requests() == 0
        settled = Settled()
        with _outbox(tmp_path, FAST, [old_dest, new_dest], settled) as back:
            assert back.retry(11) == 1
            assert settled.wait(30).state == "delivered"
        assert old_pacs.store_requests() == 1 and new_pacs.store_requests() == 0


@pytest.mark.slow
def test_destination_down_two_minutes_then_up_delivered_once(series_and_seg, tmp_path: Path) -> None:
    _, art = series_and_seg
    port = free_port()
    export = ExportSection(max_attempts=40, backoff=BackoffPolicy(initial_s=5, max_s=10), timeout_s=10, workers=2)
    settled = Settled()
    scp = StoreSCP(port, tmp_path / "in")
    with _outbox(tmp_path, export, [_dest(port)], settled) as box:
        t0 = time.monotonic()
        box.enqueue(11, art)
        time.sleep(max(0.0, 120 - (time.monotonic() - t0)))
        assert box.outcome(11) is None
        attempts_while_down = box.rows(11)[0].attempts
        scp.start()
        try:
            outcome = settled.wait(30)
            time.sleep(2)  # nothing more must arrive
        finally:
            scp.stop()
    assert outcome.state == "delivered"
    assert 10 <= attempts_while_down <= 16  # every ~10 s for two minutes
    assert scp.store_requests() == 1
    assert len(scp.received_files()) == 1
    assert len(settled.calls) == 1


# ------------------------------------------------------------------------------------------------ Orthanc


@pytest.mark.skipif(orthanc_binary() is None, reason="Orthanc not installed")
def test_orthanc_receives_seg_in_its_study(series_and_seg, tmp_path: Path) -> None:
    ws, art = series_and_seg
    orthanc = Orthanc(tmp_path / "orthanc").start()
    try:
        storescu(list(ws.files), orthanc.dicom_port, orthanc.ae_title)
        settled = Settled()
        with _outbox(tmp_path, FAST, [_dest(orthanc.dicom_port, orthanc.ae_title)], settled) as box:
            box.enqueue(21, art)
            outcome = settled.wait(60)
        assert outcome.state == "delivered", outcome
        studies = orthanc.post("/tools/find", {"Level": "Study", "Query": {"StudyInstanceUID": ws.study_instance_uid}})
        assert len(studies) == 1
        study = orthanc.get(f"/studies/{studies[0]}")
        modalities = {}
        for series_id in study["Series"]:
            s = orthanc.get(f"/series/{series_id}")
            modalities[s["MainDicomTags"]["SeriesInstanceUID"]] = (s["MainDicomTags"].get("Modality"), s["Instances"])
        assert modalities[ws.series_instance_uid][0] == "CT"
        assert len(modalities[ws.series_instance_uid][1]) == len(ws.files)
        modality, instances = modalities[art.series_instance_uid]
        assert modality == "SEG" and len(instances) == 1
        tags = orthanc.get(f"/instances/{instances[0]}/simplified-tags")
        assert tags["SOPInstanceUID"] == art.sop_instance_uid
        assert tags["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.66.4"
    finally:
        orthanc.stop()
