"""``dicom-node status`` and ``dicom-node retry``: read and nudge the state database (safe while serving)."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from dicom_node.db import DB_NAME, Database
from dicom_node.errors import NodeError
from dicom_node.export.outbox import list_exports, retry_failed_for_job
from dicom_node.jobs import FailureStage, JobState
from dicom_node.settings import Settings


def _open(settings: Settings) -> Database:
    path = settings.storage.dir / DB_NAME
    if not path.exists():
        raise NodeError(f"{path}: no state database (has the node ever run with storage.dir={settings.storage.dir}?)")
    return Database(path)


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _with_burden(job: dict[str, Any]) -> dict[str, Any]:
    """The job's stored burden numbers (JSON text in the database) as a dict, or None."""
    job["burden"] = json.loads(job["burden"]) if job.get("burden") else None
    return job


def _burden_line(burden: dict[str, Any]) -> str:
    right, left, total = burden["right"], burden["left"], burden["total"]
    return (
        f"ground glass: right {right['ggo_ml']:.1f} mL of {right['lung_ml']:.0f} mL = {right['percent']:.1f} % "
        f"(grade {right['grade']}), left {left['ggo_ml']:.1f} mL of {left['lung_ml']:.0f} mL = "
        f"{left['percent']:.1f} % (grade {left['grade']}), both {total['ggo_ml']:.1f} mL = {total['percent']:.1f} %"
    )


def collect_status(settings: Settings) -> dict[str, Any]:
    db = _open(settings)
    try:
        series = [dict(r) for r in db.query("SELECT * FROM series ORDER BY first_arrival")]
        jobs = [_with_burden(dict(r)) for r in db.query("SELECT * FROM jobs ORDER BY id")]
        events = [dict(r) for r in db.query("SELECT * FROM events ORDER BY id DESC LIMIT 50")]
    finally:
        db.close()
    out: dict[str, Any] = {"series": series, "jobs": jobs, "events": events, "exports": list_exports(settings)}
    return out


def print_status(settings: Settings, as_json: bool = False) -> int:
    status = collect_status(settings)
    if as_json:
        json.dump(status, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
        return 0
    w = sys.stdout.write
    w(f"series ({len(status['series'])})\n")
    for s in status["series"]:
        w(
            f"  {s['series_instance_uid']}  {s['modality'] or '?':<3} {s['instance_count']:>5} inst  run {s['run']}  "
            f"{s['state']:<10} last {_when(s['last_arrival'])}\n"
        )
    w(f"jobs ({len(status['jobs'])})\n")
    for j in status["jobs"]:
        reason = f"  {j['reason']}" if j["reason"] else ""
        if j.get("failure_stage"):
            reason = f"  [{j['failure_stage']}]{reason}"
        w(
            f"  {j['id']:>5}  {j['state']:<9} run {j['run']}  attempts {j['attempts']}  "
            f"{j['series_instance_uid']}  {_when(j['updated_at'])}{reason}\n"
        )
        if j.get("burden"):
            w(f"         {_burden_line(j['burden'])}\n")
    if status["exports"]:
        w(f"exports ({len(status['exports'])})\n")
        for e in status["exports"]:
            reason = f"  {e['reason']}" if e.get("reason") else ""
            if e.get("resends"):
                reason += f"  (re-sent {e['resends']}x after an interrupted send)"
            w(
                f"  job {e['job_id']:>5}  {e['state']:<9} -> {e['destination']}  attempts {e['attempts']}  "
                f"{e.get('kind', 'SEG')} {e['sop_instance_uid']}  {_when(e['updated_at'])}{reason}\n"
            )
    if status["events"]:
        w(f"recent refusals and events ({len(status['events'])})\n")
        for e in reversed(status["events"]):
            who = f" {e['calling_ae_title']}" if e["calling_ae_title"] else ""
            w(f"  {_when(e['at'])} {e['kind']}{who}: {e['reason']}\n")
    return 0


def retry(settings: Settings, job_id: str) -> int:
    """Re-run a finished job, or only re-send its SEG when what failed was the export.

    A job that failed because a destination refused or could not be reached already has its SEG: its failed
    outbox rows go back to pending and the job to EXPORTING (the running node sends within about a second).
    Any other failed, skipped or done job goes back to the queue and runs again.
    """
    try:
        jid = int(str(job_id).strip())
    except ValueError as exc:
        raise NodeError(f"job {job_id!r}: not a job id (status lists them)") from exc
    db = _open(settings)
    try:
        current = db.job(jid)
        if current is None:
            raise NodeError(f"job {jid}: no such job")
        if current.state is JobState.FAILED and current.failure_stage is FailureStage.EXPORT:
            rows = retry_failed_for_job(settings, jid)
            if rows and db.transition(jid, JobState.EXPORTING, f"retry: {rows} export(s) re-queued",
                                      expect=[JobState.FAILED]):  # fmt: skip
                print(f"job {jid}: {rows} failed export(s) re-queued (series {current.series_instance_uid})")
                return 0
        try:
            job = db.retry(jid)
        except (KeyError, ValueError) as exc:
            raise NodeError(str(exc).strip("'\"")) from exc
    finally:
        db.close()
    print(f"job {job.id} re-queued (series {job.series_instance_uid}, run {job.run})")
    return 0
