"""Atomic, durable file writes: the one helper every writer of the project uses (spool, SEG writer, MHD writers).

A file is written under a temporary name in its own folder, flushed to disk, renamed over the final name and the
folder flushed, so a reader (or a restart after a crash at any line) sees either the old file or the whole new
one, never a part. Temporary names start with :data:`TMP_PREFIX`, so start-up recovery can delete the ones a
crash left behind.

It lives in ``inference`` because that package must not import ``dicom_node``; ``dicom_node`` imports it.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_PREFIX = ".tmp-"
"""Every temporary file this helper makes starts with this (recovery deletes them)."""

FILE_MODE = 0o644
"""Outputs are meant to be read by other users (a renderer, a PACS agent)."""


def fsync_dir(folder: Path) -> None:
    """Make the folder's entries (a rename, a new file) durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(final: Path) -> Path:
    """A fresh temporary name beside ``final`` (unique across threads and processes)."""
    return final.with_name(f"{TMP_PREFIX}{final.name}.{secrets.token_hex(6)}")


def _finish(tmp: Path, final: Path, fsync: bool) -> None:
    if fsync:
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    os.replace(tmp, final)
    if fsync:
        fsync_dir(final.parent)


@contextmanager
def atomic_path(final: Path, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path for a writer that wants a file name (highdicom, numpy, shutil); on a clean exit it
    becomes ``final`` atomically (and durably with ``fsync``); on an error it is removed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(final)
    try:
        yield tmp
        if tmp.exists():
            os.chmod(tmp, FILE_MODE)
        _finish(tmp, final, fsync)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(final: Path, chunks: Iterable[bytes], *, fsync: bool = True) -> int:
    """Write ``chunks`` as ``final`` atomically; returns the bytes written. The folder must exist (the spool
    creates and flushes its folders itself, so this hot path does no mkdir)."""
    tmp = temp_path(final)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    size = 0
    try:
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    n = os.write(fd, view)
                    view = view[n:]
                    size += n
            if fsync:
                os.fdatasync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        fsync_dir(final.parent)
    return size


__all__ = ["TMP_PREFIX", "atomic_path", "fsync_dir", "temp_path", "write_atomic"]
