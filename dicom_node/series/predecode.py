"""Decode instances while their series is still arriving, so that a job finds most of its slices decoded.

The SCP calls :meth:`PreDecoder.submit` for every instance once it is durable and its row committed (the call only
queues the path: the association's thread never decodes). ``workers`` background threads decode each queued file
(``dicom_node.series.decode.predecode``) and keep its stored pixel values in memory, keyed by path and stamped with
the file's size, mtime and inode, so that an instance replaced since (a new file renamed over the old path) is
never served stale. A decode failure is kept as the ``Rejected`` message the job raises. The cache holds at most
``cap_bytes`` of pixels: past it, instances are not decoded ahead (their job decodes them as before). A job takes
what is there (waiting for what is still decoding) through :meth:`has` / :meth:`get`, then :meth:`discard` drops
its entries.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from dicom_node.series.decode import Predecoded, predecode
from dicom_node.types import InstanceRecord

log = logging.getLogger(__name__)

MAX_PENDING = 4096
"""Queued, not yet decoded instances beyond which new ones are not queued (their job decodes them)."""

_Stamp = tuple[int, int, int]


DECODER_NICENESS = 10
"""Decoding ahead is a head start, never worth slowing a sender: the decoder processes yield the CPU."""


PARENT_CHECK_S = 0.5
"""How often a decoder process looks whether the node that started it is still its parent."""


def _exit_with_parent(parent: int) -> None:
    """End this decoder process once its node is gone, however the node died (kill -9 included): the process is
    then re-parented, and nothing would ever tell it to stop. (A parent-death signal would fire when the thread
    that spawned the process ends, not the node, so the process watches its parent itself.)"""
    while os.getppid() == parent:
        time.sleep(PARENT_CHECK_S)
    os._exit(0)


def _decoder_process_init(parent: int) -> None:
    """Tie the worker process's life to the node's (``parent``, passed by the node: a process that starts after
    the node died would otherwise watch its new parent), lower its priority, and import the decoders before the
    first series arrives."""
    threading.Thread(target=_exit_with_parent, args=(parent,), name="parent-watch", daemon=True).start()
    with contextlib.suppress(OSError):
        os.nice(DECODER_NICENESS)
    import pydicom.pixels  # noqa: F401


def _stamp(path: Path) -> _Stamp | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino)


@dataclass(frozen=True, slots=True)
class _Entry:
    stamp: _Stamp
    value: Predecoded
    nbytes: int


class _Slot:
    """One submission of one path: its future and, once decoded and counted against the cap, its entry."""

    __slots__ = ("entry", "future")

    def __init__(self) -> None:
        self.future: Future[_Entry | None] | None = None
        self.entry: _Entry | None = None


class PreDecoder:
    """A bounded background decoder and its bounded cache (see the module docstring)."""

    def __init__(
        self,
        workers: int,
        cap_bytes: int,
        decode: Callable[[InstanceRecord], Predecoded | None] = predecode,
        processes: int = 0,
    ) -> None:
        """``processes`` > 0: ``decode`` (a picklable module-level function) runs in that many worker processes,
        each thread only waiting for one. Decoding is Python-heavy (parsing, pixel handler glue): in the node's
        own process it contends for the interpreter lock with the associations still receiving, which slows the
        sender several-fold on two cores; separate processes leave the receiving process alone."""
        self.cap_bytes = cap_bytes
        self._decode = decode
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers, processes), thread_name_prefix="predecode")
        self._procs: ProcessPoolExecutor | None = None
        if processes > 0:
            # spawn, not fork: the node's process runs threads (associations, workers), which fork would copy
            # mid-flight.
            self._procs = ProcessPoolExecutor(
                max_workers=processes,
                mp_context=mp.get_context("spawn"),
                initializer=_decoder_process_init,
                initargs=(os.getpid(),),
            )
            for _ in range(processes):  # start now, not when the first series arrives
                self._procs.submit(os.getpid)
        self._lock = threading.Lock()
        self._slots: dict[Path, _Slot] = {}
        self._bytes = 0
        self._pending = 0
        self._closed = False

    @property
    def cached_bytes(self) -> int:
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._slots)

    def submit(self, record: InstanceRecord) -> None:
        """Queue ``record`` for decoding; never blocks (called in the association's thread)."""
        path = record.path
        with self._lock:
            old = self._slots.pop(path, None)
            if old is not None:  # a replaced instance: the old entry goes, the new file is decoded
                self._forget(old)
            if self._closed or self._bytes >= self.cap_bytes or self._pending >= MAX_PENDING:
                return
            slot = _Slot()
            self._pending += 1
            slot.future = self._pool.submit(self._run, record, slot)
            self._slots[path] = slot

    def _forget(self, slot: _Slot) -> None:
        """Release what a dropped slot holds (called with the lock held)."""
        if slot.future is not None and slot.future.cancel():
            self._pending -= 1
        if slot.entry is not None:
            self._bytes -= slot.entry.nbytes
            slot.entry = None

    def _run(self, record: InstanceRecord, slot: _Slot) -> _Entry | None:
        with self._lock:
            self._pending -= 1
            if self._slots.get(record.path) is not slot:
                return None  # discarded or replaced before its turn
        stamp = _stamp(record.path)  # before reading: a file replaced after this no longer matches it
        if stamp is None:
            value = None
        elif self._procs is not None:
            value = self._procs.submit(self._decode, record).result()
        else:
            value = self._decode(record)
        if stamp is None or value is None:
            return None
        nbytes = value.pixels.nbytes if value.pixels is not None else 0
        with self._lock:
            if self._slots.get(record.path) is not slot or self._bytes + nbytes > self.cap_bytes:
                return None  # discarded or replaced while decoding, or over the cap: keep nothing
            self._bytes += nbytes
            slot.entry = _Entry(stamp, value, nbytes)
            return slot.entry

    # -- the job's side (dicom_node.series.reconstruct.PredecodedLookup) --------------------------------------------
    def has(self, record: InstanceRecord) -> bool:
        with self._lock:
            return record.path in self._slots

    def get(self, record: InstanceRecord) -> Predecoded | None:
        """Wait for ``record``'s decode; None when it is not usable (not decoded, over the cap, file changed)."""
        with self._lock:
            slot = self._slots.get(record.path)
        if slot is None or slot.future is None:
            return None
        try:
            entry = slot.future.result()
        except CancelledError:
            return None
        except Exception:  # a bug in the decoder thread: the job decodes the instance itself
            log.exception("pre-decoding %s", record.path)
            return None
        if entry is None or _stamp(record.path) != entry.stamp:
            return None
        return entry.value

    def discard(self, records: Iterable[InstanceRecord]) -> None:
        """Drop the entries of a finished job (decoded, still decoding or queued)."""
        with self._lock:
            for record in records:
                slot = self._slots.pop(record.path, None)
                if slot is not None:
                    self._forget(slot)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for slot in self._slots.values():
                self._forget(slot)
            self._slots.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._procs is not None:
            self._procs.shutdown(wait=True, cancel_futures=True)
