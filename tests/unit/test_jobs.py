"""The job state machine, the worker, admin's retry and the job processor, each without a network or a model
server: a real SQLite state database, small fakes for the processor and the model backend."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from dicom_node import admin
from dicom_node.db import Database, ExportItem, ExportStore, ExportTarget
from dicom_node.errors import NodeError, Rejected
from dicom_node.jobs import TRANSITIONS, FailureStage, IllegalTransition, Job, JobOutcome, JobState, sources_of
from dicom_node.processing import SeriesProcessor
from dicom_node.settings import Settings
from dicom_node.types import HeaderFacts, InstanceRecord, SeriesManifest
from dicom_node.worker import WorkerPool
from inference.errors import BackendUnavailable
from tests import factories

REPO = Path(__file__).resolve().parents[2]


def _settings(tmp_path: Path, **sections: Any) -> Settings:
    data: dict[str, Any] = {"storage": {"dir": str(tmp_path / "var"), "min_free_bytes": 0}, **sections}
    return Settings.model_validate(data)


def _record(tmp_path: Path, sop: str, series: str = "1.2.3", t: float = 1.0) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.2", study_instance_uid="1.2",
        series_instance_uid=series, transfer_syntax_uid="1.2.840.10008.1.2.1", path=tmp_path / f"{sop}.dcm",
        size=1, calling_ae_title="SCU", association_id="a1", received_at=t,
    )  # fmt: skip


def _queued_job(db: Database, tmp_path: Path) -> Job:
    db.add_instance(_record(tmp_path, "1.2.3.1"), HeaderFacts(modality="CT"))
    (stats,) = db.open_series()
    assert db.complete_series(stats, "test") is not None
    (job,) = db.jobs(JobState.QUEUED)
    return job


# -- the state machine ----------------------------------------------------------------------------------------


def test_every_state_is_declared_and_reachable() -> None:
    assert set(TRANSITIONS) == set(JobState)
    reachable = {JobState.RECEIVED} | {t for targets in TRANSITIONS.values() for t in targets}
    assert reachable == set(JobState)
    assert sources_of(JobState.QUEUED) == {
        JobState.COMPLETE, JobState.INFERRING, JobState.DONE, JobState.SKIPPED, JobState.FAILED
    }  # fmt: skip


def test_database_refuses_a_move_the_machine_does_not_allow(tmp_path: Path) -> None:
    db = Database(tmp_path / "state.sqlite3")
    job = _queued_job(db, tmp_path)
    assert not db.transition(job.id, JobState.DONE, "skip the run")  # QUEUED -> DONE is not a transition
    assert db.job(job.id).state is JobState.QUEUED  # type: ignore[union-attr]
    with pytest.raises(IllegalTransition, match="queued -> done"):
        db.transition(job.id, JobState.DONE, expect=[JobState.QUEUED])
    claimed = db.claim(60)
    assert claimed is not None and claimed.state is JobState.INFERRING and claimed.attempts == 1
    assert db.transition(job.id, JobState.FAILED, "bad input", stage=FailureStage.INPUT)
    failed = db.job(job.id)
    assert failed is not None and failed.failure_stage is FailureStage.INPUT
    retried = db.retry(job.id)
    assert retried.state is JobState.QUEUED and retried.attempts == 0 and retried.failure_stage is None
    db.close()


def test_an_older_database_gains_the_failure_stage_column(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "state.sqlite3"
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, study_instance_uid TEXT NOT NULL, "
        "series_instance_uid TEXT NOT NULL, run INTEGER NOT NULL, state TEXT NOT NULL, reason TEXT, "
        "attempts INTEGER NOT NULL DEFAULT 0, lease_expires_at REAL, not_before REAL, created_at REAL NOT NULL, "
        "updated_at REAL NOT NULL, UNIQUE (series_instance_uid, run))"
    )
    conn.execute("INSERT INTO jobs VALUES (1, '1.2', '1.2.3', 1, 'failed', 'old', 1, NULL, NULL, 0, 0)")
    conn.commit()
    conn.close()
    db = Database(path)
    job = db.job(1)
    assert job is not None and job.state is JobState.FAILED and job.failure_stage is None
    db.close()


# -- the worker -----------------------------------------------------------------------------------------------


class ScriptedProcessor:
    """Answers each job with the next scripted outcome (or raises it)."""

    def __init__(self, *outcomes: JobOutcome | Exception) -> None:
        self.outcomes = list(outcomes)
        self.calls = 0

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def on_stored(self, record: InstanceRecord) -> None: ...

    def backend_problem(self) -> str | None:
        return None

    def backend_endpoints(self) -> tuple[()]:
        return ()

    def process(self, job: Job, manifest: SeriesManifest) -> JobOutcome:
        self.calls += 1
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


@pytest.mark.parametrize(
    ("outcome", "state", "stage", "attempts_left"),
    [
        (JobOutcome.done("ok"), JobState.DONE, None, False),
        (JobOutcome.skipped("not CT"), JobState.SKIPPED, None, False),
        (JobOutcome.failed("no model", FailureStage.INFERENCE), JobState.FAILED, FailureStage.INFERENCE, False),
        (Rejected("series 1.2.3: cannot decode"), JobState.FAILED, FailureStage.INPUT, False),
        (JobOutcome.failed("busy", FailureStage.INFERENCE, retryable=True), JobState.QUEUED, None, True),
        (RuntimeError("a bug"), JobState.QUEUED, None, True),
    ],
)
def test_worker_records_each_outcome_as_one_transition(
    tmp_path: Path, outcome: Any, state: JobState, stage: FailureStage | None, attempts_left: bool
) -> None:
    settings = _settings(tmp_path, workers={"max_attempts": 3, "backoff": {"initial_s": 7, "max_s": 60}})
    db = Database(tmp_path / "state.sqlite3")
    job = _queued_job(db, tmp_path)
    pool = WorkerPool(settings, db, ScriptedProcessor(outcome))
    before = time.time()
    assert pool.run_one()
    after = db.job(job.id)
    assert after is not None and after.state is state and after.failure_stage is stage
    if attempts_left:  # back in the queue, due after workers.backoff's first delay
        row = db.query("SELECT not_before FROM jobs WHERE id=?", (job.id,))[0]
        assert before + 7 - 1 <= row["not_before"] <= time.time() + 7
        assert not pool.run_one()  # not due yet
    db.close()


def test_worker_fails_a_retryable_job_after_max_attempts(tmp_path: Path) -> None:
    settings = _settings(tmp_path, workers={"max_attempts": 2})
    db = Database(tmp_path / "state.sqlite3")
    job = _queued_job(db, tmp_path)
    busy = JobOutcome.failed("backend busy", FailureStage.INFERENCE, retryable=True)
    pool = WorkerPool(settings, db, ScriptedProcessor(busy, busy))
    assert pool.run_one()
    db.query("UPDATE jobs SET not_before=NULL")  # make it due now
    assert pool.run_one()
    after = db.job(job.id)
    assert after is not None and after.state is JobState.FAILED and after.attempts == 2
    assert after.failure_stage is FailureStage.INFERENCE
    assert "failed after 2 attempts: backend busy" in (after.reason or "")
    db.close()


def test_an_unavailable_backend_holds_the_job_without_spending_attempts(tmp_path: Path) -> None:
    settings = _settings(
        tmp_path,
        workers={"max_attempts": 1, "backend_max_wait_s": 30, "backoff": {"initial_s": 2, "max_s": 4}},
    )
    db = Database(tmp_path / "state.sqlite3")
    job = _queued_job(db, tmp_path)
    down = JobOutcome.unavailable("inference backend unavailable: Triton at 127.0.0.1:1 is unreachable")
    pool = WorkerPool(settings, db, ScriptedProcessor(down, down, down))
    for _ in range(2):
        assert pool.run_one()
        held = db.job(job.id)
        assert held is not None and held.state is JobState.QUEUED and held.attempts == 0
        db.query("UPDATE jobs SET not_before=NULL")
    assert held.deferrals == 2 and held.deferred_since is not None
    assert "no attempt spent" in (held.reason or "")
    # Past workers.backend_max_wait_s the job fails, naming the backend and the wait.
    db.query("UPDATE jobs SET deferred_since=deferred_since-60")
    assert pool.run_one()
    failed = db.job(job.id)
    assert failed is not None and failed.state is JobState.FAILED and failed.failure_stage is FailureStage.INFERENCE
    assert "127.0.0.1:1 is unreachable" in (failed.reason or "") and "backend_max_wait_s=30" in (failed.reason or "")
    db.close()


# -- admin ----------------------------------------------------------------------------------------------------


def test_retry_resends_an_export_failure_and_reruns_anything_else(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = _settings(tmp_path)
    db = Database(settings.storage.dir / "state.sqlite3")
    job = _queued_job(db, tmp_path)
    db.claim(60)
    assert db.transition(job.id, JobState.EXPORTING, "queued for 1 destination")
    store = ExportStore.open(db.path)
    item = ExportItem("SEG", "9.9.1", "9.9", "1.2", tmp_path / "seg.dcm")
    store.enqueue(job.id, [item], [ExportTarget("P@h:1", "P", "h", 1, "N")], 0)
    store.conn.execute("UPDATE outbox SET state='failed', reason='refused'")
    assert db.transition(job.id, JobState.FAILED, "export failed: refused", stage=FailureStage.EXPORT)

    assert admin.retry(settings, str(job.id)) == 0
    assert "1 failed export(s) re-queued" in capsys.readouterr().out
    again = db.job(job.id)
    assert again is not None and again.state is JobState.EXPORTING and again.attempts == 1  # not re-run
    assert [r.state for r in store.rows(job.id)] == ["pending"]

    assert db.transition(job.id, JobState.DONE, "delivered")
    assert admin.retry(settings, str(job.id)) == 0
    rerun = db.job(job.id)
    assert rerun is not None and rerun.state is JobState.QUEUED and rerun.attempts == 0
    with pytest.raises(NodeError, match="only failed, skipped or done"):
        admin.retry(settings, str(job.id))
    with pytest.raises(NodeError, match="not a job id"):
        admin.retry(settings, "one")
    db.close()


def test_status_shows_the_failure_stage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = _settings(tmp_path)
    db = Database(settings.storage.dir / "state.sqlite3")
    job = _queued_job(db, tmp_path)
    db.claim(60)
    db.transition(job.id, JobState.FAILED, "series 1.2.3: cannot decode", stage=FailureStage.INPUT)
    db.close()
    admin.print_status(settings)
    assert "failed    run 1  attempts 1" in capsys.readouterr().out.replace("[input]", "")
    status = admin.collect_status(settings)
    assert status["jobs"][0]["failure_stage"] == "input"


# -- the job processor, with a fake model backend ---------------------------------------------------------------


class ThresholdBackend:
    """Logits [0, x - 0.5]: label 1 where the normalised intensity is above 0.5 (HU above -250)."""

    name = "threshold"

    def __init__(self) -> None:
        self.batches = 0

    def check(self) -> None: ...

    def infer(self, batch: np.ndarray) -> np.ndarray:
        self.batches += 1
        return np.concatenate([np.zeros_like(batch), batch - 0.5], axis=1)

    def close(self) -> None: ...


class DownBackend(ThresholdBackend):
    def infer(self, batch: np.ndarray) -> np.ndarray:
        raise BackendUnavailable("Triton at 127.0.0.1:1 is unreachable: connection refused")


def _small_spec(tmp_path: Path) -> Path:
    data = json.loads((REPO / "config" / "config_inference.json").read_text())
    data["inferer"].update({"roi_size": [64, 64, 8], "batch_size": 2})
    data["post_transforms"].pop("lung_fields", None)
    path = tmp_path / "spec" / "config_inference.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(data))
    return path


@pytest.fixture()
def phantom_series(tmp_path: Path) -> factories.WrittenSeries:
    z, y, x = np.meshgrid(*[np.linspace(-1, 1, n) for n in (10, 48, 48)], indexing="ij")
    hu = np.where(x**2 + y**2 + z**2 < 0.4, 100, -900).astype(np.int16)
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((4.0, 4.0, 5.0))
    return factories.write_ct_series(image, tmp_path / "series", tag="processor-unit")


def _processor(tmp_path: Path, backend: ThresholdBackend) -> tuple[SeriesProcessor, Database]:
    settings = _settings(
        tmp_path, inference={"config": str(_small_spec(tmp_path))}, reconstruction={"predecode_cache_mb": 0}
    )
    db = Database(settings.storage.dir / "state.sqlite3")

    @contextlib.contextmanager
    def factory(_settings: Settings, _spec: Any, _name: str | None) -> Iterator[ThresholdBackend]:
        yield backend

    return SeriesProcessor(settings, db, backend_factory=factory), db


def _manifest(series: factories.WrittenSeries) -> tuple[Job, SeriesManifest]:
    def record(p: Path) -> InstanceRecord:
        return InstanceRecord(
            sop_instance_uid=p.stem, sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            study_instance_uid=series.study_instance_uid, series_instance_uid=series.series_instance_uid,
            transfer_syntax_uid="1.2.840.10008.1.2.1", path=p, size=p.stat().st_size, calling_ae_title="SCU",
            association_id="a1", received_at=0.0,
        )  # fmt: skip

    records = tuple(record(p) for p in series.files)
    job = Job(7, series.study_instance_uid, series.series_instance_uid, 1, JobState.INFERRING, 1, None, 0.0, 0.0)
    return job, SeriesManifest(series.study_instance_uid, series.series_instance_uid, records)


def test_processor_writes_the_seg_of_what_the_model_marks(
    tmp_path: Path, phantom_series: factories.WrittenSeries
) -> None:
    backend = ThresholdBackend()
    processor, db = _processor(tmp_path, backend)
    job, manifest = _manifest(phantom_series)
    outcome = processor.process(job, manifest)
    assert outcome.state is JobState.DONE, outcome
    seg = pydicom.dcmread(processor.results_dir / "job-7" / "seg.dcm")
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == phantom_series.study_instance_uid
    assert int(seg.NumberOfFrames) >= 3 and backend.batches >= 1
    db.close()


def test_processor_holds_a_job_whose_backend_is_unreachable(
    tmp_path: Path, phantom_series: factories.WrittenSeries
) -> None:
    processor, db = _processor(tmp_path, DownBackend())
    outcome = processor.process(*_manifest(phantom_series))
    assert outcome.state is JobState.QUEUED and outcome.deferred and outcome.stage is FailureStage.INFERENCE
    assert "unreachable" in (outcome.reason or "")
    db.close()


def test_processor_refuses_a_series_without_frame_of_reference_before_inference(
    tmp_path: Path, phantom_series: factories.WrittenSeries
) -> None:
    for path in phantom_series.files:
        ds = pydicom.dcmread(path)
        del ds.FrameOfReferenceUID
        ds.save_as(path)
    backend = ThresholdBackend()
    processor, db = _processor(tmp_path, backend)
    outcome = processor.process(*_manifest(phantom_series))
    assert outcome.state is JobState.FAILED and outcome.stage is FailureStage.INPUT
    assert "FrameOfReferenceUID" in (outcome.reason or "")
    assert backend.batches == 0  # refused from the headers, before any inference
    db.close()
