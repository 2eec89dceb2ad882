"""Decode timing: a JPEG Lossless CT series reconstructed with decode threads vs decode processes.

Writes lung1 (48 slices) and a 300-slice mirror of it (``tests.factories.tall_volume``) as JPEG Lossless SV1
(dcmcjpeg), then times ``reconstruct`` (threads, ``decode_workers`` 1 and 2) against a process pool (2 processes
decoding into a shared-memory volume). Prints the median of three rounds of each.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context, shared_memory
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import JPEGLosslessSV1

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dicom_node.series.reconstruct import reconstruct  # noqa: E402
from dicom_node.settings import ReconstructionSection  # noqa: E402
from dicom_node.types import InstanceRecord, SeriesManifest  # noqa: E402
from tests.factories import read_volume, tall_volume, write_ct_series  # noqa: E402

_shm: shared_memory.SharedMemory | None = None


def _attach(name: str) -> None:
    global _shm
    _shm = shared_memory.SharedMemory(name=name)


def _decode_one(args: tuple[str, int, tuple[int, int, int]]) -> None:
    from pydicom.pixels.utils import pixel_array

    path, slot, shape = args
    assert _shm is not None
    volume = np.ndarray(shape, dtype=np.float32, buffer=_shm.buf)
    ds = pydicom.dcmread(path)
    np.add(pixel_array(ds), np.float32(float(ds.RescaleIntercept)), out=volume[slot], casting="unsafe")


def _processes(files: list[Path], workers: int) -> float:
    """Header pass + sort as reconstruct does, then decode in a process pool into shared memory."""
    start = time.perf_counter()
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    order = sorted(range(len(files)), key=lambda i: float(headers[i].ImagePositionPatient[2]))
    shape = (len(files), int(headers[0].Rows), int(headers[0].Columns))
    shm = shared_memory.SharedMemory(create=True, size=int(np.prod(shape)) * 4)
    try:
        with ProcessPoolExecutor(workers, mp_context=get_context("forkserver"), initializer=_attach,
                                 initargs=(shm.name,)) as pool:  # fmt: skip
            list(pool.map(_decode_one, [(str(files[i]), s, shape) for s, i in enumerate(order)], chunksize=8))
        return time.perf_counter() - start
    finally:
        shm.close()
        shm.unlink()


def _manifest(files: list[Path]) -> SeriesManifest:
    recs = tuple(InstanceRecord("", "", "", "", "", f, 0, "", "", 0.0) for f in files)
    return SeriesManifest("", "", recs)


def main() -> None:
    lung1 = read_volume(ROOT.parent / "shared" / "data" / "chest_ct_volumes" / "lung1_image.nrrd")
    with tempfile.TemporaryDirectory() as tmp:
        cases = {
            "lung1 48 slices": write_ct_series(lung1, Path(tmp) / "a", transfer_syntax=JPEGLosslessSV1, tag="b48"),
            "tall 300 slices": write_ct_series(tall_volume(lung1, 300), Path(tmp) / "b",
                                               transfer_syntax=JPEGLosslessSV1, tag="b300"),
        }  # fmt: skip
        print(f"{'series':18} {'threads x1':>11} {'threads x2':>11} {'processes x2':>13}  (median of 3, seconds)")
        for name, written in cases.items():
            files = list(written.files)
            row = []
            for workers in (1, 2):
                policy = ReconstructionSection(decode_workers=workers)
                times = []
                for _ in range(3):
                    t = time.perf_counter()
                    reconstruct(_manifest(files), policy)
                    times.append(time.perf_counter() - t)
                row.append(statistics.median(times))
            row.append(statistics.median(_processes(files, 2) for _ in range(3)))
            print(f"{name:18} {row[0]:11.2f} {row[1]:11.2f} {row[2]:13.2f}")


if __name__ == "__main__":
    main()
