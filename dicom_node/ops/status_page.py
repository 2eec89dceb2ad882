"""The read-only status page at ``/``: what ``dicom-node status`` shows, as server-rendered HTML.

The data is what ``dicom-node status --json`` prints (series, jobs, exports, recent refusals and events), so the
page and the CLI can never disagree; each job's preview image (``results/job-<id>/preview.png``, written by the
outputs stage when it makes one) is shown when the file exists. Jinja2 renders it with autoescaping on, so no
value from a sender (UIDs, AE titles, reasons quoting their data) can inject markup; the page has no
JavaScript and the server forbids scripts (``Content-Security-Policy``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

from dicom_node.ops.health import Readiness

MAX_ROWS = 200
"""Most recent jobs and series shown (the CLI lists them all)."""

REFRESH_S = 15


@dataclass(frozen=True, slots=True)
class NodeInfo:
    ae_title: str
    version: str
    listeners: str
    storage_dir: str
    destinations: int


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _elapsed(job: dict[str, Any]) -> str:
    created, updated = job.get("created_at"), job.get("updated_at")
    if not created or not updated:
        return "-"
    seconds = max(0.0, float(updated) - float(created))
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


class StatusPage:
    """Renders the page; one per node (the template environment is its own, not a module global)."""

    def __init__(self) -> None:
        self._env = Environment(
            loader=PackageLoader("dicom_node.ops", "templates"),
            autoescape=select_autoescape(["html"], default=True),
            undefined=StrictUndefined,
        )
        self._env.filters["when"] = _when
        self._template = self._env.get_template("status.html")

    def render(
        self,
        status: dict[str, Any],
        readiness: Readiness,
        node: NodeInfo,
        preview_url: Callable[[int], str | None],
    ) -> str:
        """``status`` is ``collect_status``'s; ``preview_url(job_id)`` the URL of the job's preview, if any."""
        jobs = sorted(status["jobs"], key=lambda j: int(j["id"]), reverse=True)
        shown = [{**j, "elapsed": _elapsed(j), "preview": preview_url(int(j["id"]))} for j in jobs[:MAX_ROWS]]
        series = sorted(status["series"], key=lambda s: float(s["last_arrival"] or 0), reverse=True)
        return self._template.render(
            node=node,
            readiness=readiness,
            jobs=shown,
            jobs_total=len(jobs),
            series=series[:MAX_ROWS],
            series_total=len(series),
            exports=list(reversed(status["exports"]))[:MAX_ROWS],
            events=status["events"],
            now=time.time(),
            refresh_s=REFRESH_S,
        )
