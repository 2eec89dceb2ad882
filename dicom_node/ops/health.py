"""``/healthz`` and ``/readyz``: is the process alive, and can it take a study now?

Readiness is the conjunction of four honest checks, each with a line that says what it found:

- ``scp``: every configured DIMSE listener (plain, TLS) has its socket open;
- ``database``: a small write to the state database commits (a read-only or full disk fails it);
- ``storage``: the spool would take an instance now: free space in ``storage.dir`` is at least
  ``storage.min_free_bytes`` (below it the SCP answers every C-STORE with Out of Resources; the spool's own
  check decides, so the probe and the SCP cannot disagree);
- ``backend``: the model backend is open and checked (a managed Triton still starting, or an unreachable one,
  is not ready; jobs wait for it, reception goes on).

Liveness says only that the process answers: an orchestrator that restarts on a failed readiness check would
restart a node that is waiting for its Triton, or for disk space, for no gain.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dicom_node import __version__
from dicom_node.db import Database
from dicom_node.receive.spool import DiskFull, Spool


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True, slots=True)
class Readiness:
    checks: tuple[Check, ...]

    @property
    def ready(self) -> bool:
        return all(c.ok for c in self.checks)

    def as_json(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "failed": [c.name for c in self.checks if not c.ok],
            "checks": {c.name: {"ok": c.ok, "detail": c.detail} for c in self.checks},
        }


class Probes:
    """The checks, on the running node's parts (given as the callables and handles they need)."""

    def __init__(
        self,
        *,
        db: Database,
        spool: Spool,
        listener_problem: Callable[[], str | None],
        backend_problem: Callable[[], str | None],
        listeners: Callable[[], str],
    ) -> None:
        self.db = db
        self.spool = spool
        self.listener_problem = listener_problem
        self.backend_problem = backend_problem
        self.listeners = listeners
        self.started = time.monotonic()

    def liveness(self) -> dict[str, Any]:
        return {"alive": True, "version": __version__, "uptime_s": round(time.monotonic() - self.started, 1)}

    def readiness(self) -> Readiness:
        return Readiness((self._scp(), self._database(), self._storage(), self._backend()))

    def _scp(self) -> Check:
        problem = self.listener_problem()
        return Check("scp", problem is None, problem or f"listening: {self.listeners()}")

    def _database(self) -> Check:
        try:
            self.db.heartbeat()
        except (sqlite3.Error, OSError) as exc:
            return Check("database", False, f"{self.db.path}: a write failed: {exc}")
        return Check("database", True, f"{self.db.path}: writable")

    def _storage(self) -> Check:
        root = self.spool.root
        try:
            self.spool.check_space(0)
            free = self.spool.free_bytes()
        except DiskFull as exc:
            return Check("storage", False, str(exc))
        except OSError as exc:
            return Check("storage", False, f"storage {root}: {exc.strerror or exc}")
        return Check("storage", True, f"{root}: {free} bytes free (storage.min_free_bytes {self.spool.min_free_bytes})")

    def _backend(self) -> Check:
        problem = self.backend_problem()
        return Check("backend", problem is None, problem or "ready")
