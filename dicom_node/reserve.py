"""A reserve of disk space in the storage folder, so the state database can still record what happens when the
disk fills up.

On a full disk SQLite cannot commit even a one-row update, so a job whose results could not be written could not
be put back in the queue either, and would wait for its lease (30 minutes by default). The node therefore keeps a
file of ``storage.reserve_bytes`` in the storage folder while there is room. When free space falls below a
quarter of the reserve (something else filled the disk), the reserve is released: the database has room for its
transitions again, and reception answers Out of Resources (0xA700) until free space is back above twice the
reserve, when the reserve is taken again.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path

log = logging.getLogger(__name__)

RESERVE_NAME = "disk-reserve"
CHECK_INTERVAL_S = 1.0


class DiskReserve:
    """Holds (a file of) ``size`` bytes at ``path`` while the disk has room; thread-safe."""

    def __init__(self, folder: Path, size: int) -> None:
        self.path = folder / RESERVE_NAME
        self.size = size
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        """True while the reserve file exists at full size (always True for a reserve of 0 bytes)."""
        if self.size <= 0:
            return True
        try:
            return self.path.stat().st_size >= self.size
        except OSError:
            return False

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.path.parent).free

    def check(self) -> None:
        """Release the reserve when the disk is nearly full; take it again once there is room."""
        if self.size <= 0:
            return
        with self._lock:
            held = self.held
            free = self.free_bytes()
            if held and free < self.size // 4:
                self.path.unlink(missing_ok=True)
                log.error(
                    f"storage {self.path.parent}: disk nearly full ({free} bytes free): released the "
                    f"{self.size}-byte reserve so the state database can record; reception answers 0xA700 "
                    "until there is room again"
                )
            elif not held and free >= 2 * self.size:
                self._allocate()
                if self.held:
                    log.info(f"storage {self.path.parent}: room again; the {self.size}-byte reserve is held")

    def _allocate(self) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, self.size)
            finally:
                os.close(fd)
        except OSError as exc:
            self.path.unlink(missing_ok=True)
            log.warning(f"storage {self.path.parent}: cannot take the disk reserve: {exc.strerror or exc}")

    def start(self) -> None:
        """Take the reserve if there is room, and watch free space every second."""
        self.check()
        self._thread = threading.Thread(target=self._run, name="disk-reserve", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(CHECK_INTERVAL_S):
            try:
                self.check()
            except OSError:
                log.exception("disk reserve check failed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


__all__ = ["RESERVE_NAME", "DiskReserve"]
