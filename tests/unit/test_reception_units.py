"""Pure pieces of the receiving node: completion decisions, spool names, job-state transitions."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_node.db import Database
from dicom_node.jobs import JobState
from dicom_node.receive.completion import CompletionStats, decide
from dicom_node.receive.spool import Spool, uid_key
from dicom_node.series.headers import is_acceptable_uid
from dicom_node.settings import SeriesSection
from dicom_node.types import HeaderFacts, InstanceRecord

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _stack(n: int, step: float = 5.0, skip: int | None = None) -> list[list[float]]:
    return [[0.0, 0.0, k * step] for k in range(n) if k != skip]


def test_quiet_timer_completes() -> None:
    policy = SeriesSection(quiet_seconds=10)
    stats = CompletionStats(instance_count=3, last_arrival=100.0, released=False)
    assert not decide(stats, 105.0, policy).complete
    assert decide(stats, 105.0, policy).recheck_at == 110.0
    assert decide(stats, 110.0, policy).complete


def test_release_completes_only_a_regular_stack() -> None:
    policy = SeriesSection(quiet_seconds=10)
    regular = CompletionStats(10, 100.0, True, [AXIAL] * 10, _stack(10))
    gap = CompletionStats(9, 100.0, True, [AXIAL] * 9, _stack(10, skip=4))
    assert decide(regular, 101.0, policy).complete
    assert not decide(gap, 101.0, policy).complete
    assert not decide(CompletionStats(10, 100.0, False, [AXIAL] * 10, _stack(10)), 101.0, policy).complete
    off = SeriesSection(quiet_seconds=10, complete_on_release=False)
    assert not decide(regular, 101.0, off).complete


@pytest.mark.parametrize("uid", ["../../etc", "/tmp/x", "1.2..3", ".", "", "1.2/3", "a" * 65])
def test_hostile_uids_never_become_paths(tmp_path: Path, uid: str) -> None:
    assert not is_acceptable_uid(uid)
    key = uid_key(uid)
    assert "/" not in key and ".." not in key and key.startswith("x")
    spool = Spool(tmp_path, fsync=False)
    assert spool.contains(spool.path_for(uid, uid, uid))


def test_valid_uid_is_its_own_name() -> None:
    assert uid_key("1.2.840.10008.5.1.4.1.1.2") == "1.2.840.10008.5.1.4.1.1.2"
    assert uid_key("1.2.03") != "1.2.03"  # leading zero: accepted, but hashed


def _rec(tmp_path: Path, sop: str, series: str = "1.2.3", t: float = 1.0) -> InstanceRecord:
    return InstanceRecord(sop, "1.2.840.10008.5.1.4.1.1.2", "1.2", series, "1.2.840.10008.1.2.1",
                          tmp_path / sop, 10, "SCU", "a1", t)  # fmt: skip


def test_job_lifecycle_rerun_retry_and_lease(tmp_path: Path) -> None:
    db = Database(tmp_path / "state.sqlite3")
    first = db.add_instance(_rec(tmp_path, "1.2.3.1"), HeaderFacts(modality="CT"))
    dup = db.add_instance(_rec(tmp_path, "1.2.3.1", t=2.0), HeaderFacts(modality="CT"))
    assert first.job_id == dup.job_id and dup.replaced
    [open_series] = db.open_series()
    assert open_series.instance_count == 1
    assert db.complete_series(open_series, "quiet")
    job = db.claim(lease_seconds=60)
    assert job is not None and job.state is JobState.INFERRING and job.attempts == 1
    assert db.requeue_expired(all_inferring=True) == [job.id]  # a restart: back to the queue
    job = db.claim(lease_seconds=60)
    assert job is not None and job.attempts == 2
    assert db.transition(job.id, JobState.FAILED, "boom", expect=[JobState.INFERRING])
    again = db.retry(job.id)
    assert again.state is JobState.QUEUED and again.attempts == 0
    with pytest.raises(KeyError, match="job 999"):
        db.retry(999)
    # After the run completed, a new instance opens run 2 (policy rerun).
    later = db.add_instance(_rec(tmp_path, "1.2.3.2", t=5.0), HeaderFacts(modality="CT"))
    assert later.run == 2 and later.job_id != job.id
    db.close()
