"""The durable spool: received bytes, laid out by study and series, under names no UID can steer.

Layout under ``<storage.dir>``::

    spool/<study key>/<series key>/<instance key>.dcm     one file per SOP instance, bytes as received
    quarantine/<time>-<digest>.dcm + .reason.txt           objects refused after receipt, with the reason

A key is the UID itself when it is a well-formed UI value (digits and dots, no empty or leading-zero component,
64 characters at most: such a name cannot contain a separator or ``..``), otherwise ``x`` + a SHA-256 prefix of
the raw value. Nothing from a dataset is ever joined to a path without going through :func:`uid_key`.

Every write goes through :func:`inference.atomic.write_atomic` (temp file in the target folder -> write -> fsync
-> atomic rename -> fsync of the folder), and each parent created on the way is flushed too, so once
:meth:`Spool.store` returns the file survives a crash or power loss, and a reader never sees a half-written file.
A second store of the same SOP Instance UID replaces the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from dicom_node.errors import Transient
from dicom_node.reserve import DiskReserve
from inference.atomic import TMP_PREFIX, fsync_dir, write_atomic

UID_GRAMMAR = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
"""PS3.5 9.1: components of digits, no leading zero, separated by single dots."""
SUFFIX = ".dcm"


class DiskFull(Transient):
    """Free space in the storage folder is below ``storage.min_free_bytes``."""


def uid_key(uid: str) -> str:
    """A file name for ``uid`` that cannot leave its folder: the UID itself if well-formed, else a digest."""
    if len(uid) <= 64 and UID_GRAMMAR.match(uid):
        return uid
    return "x" + hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()[:40]


class Spool:
    """Writes and finds instance files; thread-safe."""

    def __init__(
        self, root: Path, *, fsync: bool = True, min_free_bytes: int = 0, reserve: DiskReserve | None = None
    ) -> None:
        self.root = root
        self.spool_dir = root / "spool"
        self.quarantine_dir = root / "quarantine"
        self.fsync = fsync
        self.min_free_bytes = min_free_bytes
        self.reserve = reserve
        self._known_dirs: set[Path] = set()
        self._lock = threading.Lock()
        self._free_checked_at = 0.0
        self._free_bytes = 0
        for d in (self.root, self.spool_dir, self.quarantine_dir):
            self._ensure_dir(d)

    # -- paths ---------------------------------------------------------------------------------------------
    def path_for(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        return self.spool_dir / uid_key(study_uid) / uid_key(series_uid) / (uid_key(sop_uid) + SUFFIX)

    def contains(self, path: Path) -> bool:
        """True when ``path`` lies inside the spool folder (a guard, on top of the key scheme)."""
        try:
            path.resolve().relative_to(self.spool_dir.resolve())
        except ValueError:
            return False
        return True

    def _ensure_dir(self, path: Path) -> None:
        if path in self._known_dirs:
            return
        with self._lock:
            if path in self._known_dirs:
                return
            missing: list[Path] = []
            p = path
            while not p.exists():
                missing.append(p)
                p = p.parent
            for d in reversed(missing):
                with contextlib.suppress(FileExistsError):
                    d.mkdir()
            if self.fsync and missing:
                # A new directory entry is durable only once its parent is fsync'd.
                for d in missing:
                    fsync_dir(d.parent)
            self._known_dirs.add(path)

    # -- space ---------------------------------------------------------------------------------------------
    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def check_space(self, incoming: int) -> None:
        """Raise :class:`DiskFull` when storing ``incoming`` more bytes would go below the threshold, or while the
        disk reserve is given up to the state database (the disk filled)."""
        if self.reserve is not None and not self.reserve.held:
            raise DiskFull(
                f"storage {self.root}: the disk is full ({self.free_bytes()} bytes free; its reserve is in use by "
                "the state database)"
            )
        if self.min_free_bytes <= 0:
            return
        now = time.monotonic()
        # statvfs is cheap, but not free: refresh at most every 50 ms and account for what we wrote since.
        if now - self._free_checked_at > 0.05:
            self._free_bytes = self.free_bytes()
            self._free_checked_at = now
        else:
            self._free_bytes -= incoming
        if self._free_bytes - incoming < self.min_free_bytes:
            raise DiskFull(
                f"storage {self.root}: {self._free_bytes} bytes free, below storage.min_free_bytes="
                f"{self.min_free_bytes}"
            )

    # -- writes --------------------------------------------------------------------------------------------
    def _write_atomic(self, final: Path, chunks: tuple[bytes, ...]) -> int:
        self._ensure_dir(final.parent)
        return write_atomic(final, chunks, fsync=self.fsync)

    def store(self, study_uid: str, series_uid: str, sop_uid: str, *chunks: bytes) -> tuple[Path, int]:
        """Durably store one instance's bytes (preamble + meta + dataset as chunks); returns (path, size)."""
        path = self.path_for(study_uid, series_uid, sop_uid)
        if not self.contains(path.parent):
            raise ValueError(f"refusing to write outside the spool: {path}")
        size = self._write_atomic(path, chunks)
        return path, size

    def quarantine(self, reason: str, *chunks: bytes) -> Path:
        """Keep an object we refused, with the reason beside it. Returns the object's path."""
        digest = hashlib.sha256(b"".join(chunks[:1]) + reason.encode()).hexdigest()[:16]
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        path = self.quarantine_dir / f"{stamp}-{time.time_ns() % 10**9:09d}-{digest}{SUFFIX}"
        self._write_atomic(path, chunks)
        self._write_atomic(path.with_suffix(".reason.txt"), (reason.encode("utf-8", "replace") + b"\n",))
        return path

    # -- recovery ------------------------------------------------------------------------------------------
    def remove_temp_files(self) -> int:
        """Delete temp files a crash left behind (never acknowledged). Returns how many."""
        count = 0
        for base in (self.spool_dir, self.quarantine_dir):
            for dirpath, _dirs, files in os.walk(base):
                for name in files:
                    if name.startswith(TMP_PREFIX):
                        Path(dirpath, name).unlink(missing_ok=True)
                        count += 1
        return count

    def iter_files(self) -> Iterator[Path]:
        """Every stored instance file."""
        for dirpath, _dirs, files in os.walk(self.spool_dir):
            for name in files:
                if name.endswith(SUFFIX) and not name.startswith(TMP_PREFIX):
                    yield Path(dirpath, name)
