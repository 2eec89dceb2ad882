"""Receive benchmark: dcmtk ``storescu`` sends one 300-slice CT series to the node and to dcmtk's ``storescp +xa``.

Turn about, three rounds (by default), TCP_NODELAY=1 on both sides; the node runs as ``dicom-node serve`` with
its defaults (fsync on). Prints both medians and the ratio storescp time / node time (target >= 1.0).

    .venv/bin/python bench/receive.py [--slices 300] [--rounds 3] [--syntax jpll|raw] [--associations 1]

``--associations N`` splits the series over N storescu processes started together (parallel associations);
dcmtk's storescp serves associations one after the other, the node in parallel.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pydicom.uid import ExplicitVRLittleEndian, JPEGLosslessSV1  # noqa: E402

from tests import factories  # noqa: E402
from tests.dimse import DCMTK_ENV, NODE_AET, STORESCP, STORESCU, free_port, node_config, wait_port, write_config  # noqa: E402

OUT = REPO / "bench" / "out"
SHARED = REPO.parent / "shared" / "data"


def series(slices: int, syntax: str) -> list[Path]:
    folder = OUT / f"receive_{syntax}_{slices}"
    marker = folder / ".complete"
    if not marker.exists():
        shutil.rmtree(folder, ignore_errors=True)
        image = factories.tall_volume(factories.read_volume(SHARED / "chest_ct_volumes" / "lung1_image.nrrd"), slices)
        ts = JPEGLosslessSV1 if syntax == "jpll" else ExplicitVRLittleEndian
        factories.write_ct_series(image, folder, transfer_syntax=ts, shuffle=True, tag=f"bench-{slices}")
        marker.touch()
    return sorted(folder.glob("*.dcm"))


def send(port: int, files: list[Path], syntax: str, associations: int) -> float:
    propose = "-xs" if syntax == "jpll" else "-xe"
    chunks = [files[i::associations] for i in range(associations)]
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            [STORESCU, "-aet", "BENCH", "-aec", NODE_AET, propose, "-R", "127.0.0.1", str(port), *map(str, chunk)],
            env=DCMTK_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for chunk in chunks
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode()[-800:]}")
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--syntax", choices=("jpll", "raw"), default="jpll")
    ap.add_argument("--associations", type=int, default=1)
    ap.add_argument("--no-fsync", action="store_true", help="node with storage.fsync=false (for comparison only)")
    args = ap.parse_args()
    files = series(args.slices, args.syntax)
    size = sum(f.stat().st_size for f in files)
    print(f"series: {len(files)} files, {size / 1e6:.1f} MB, {args.syntax}, {args.associations} association(s)")

    node_times: list[float] = []
    dcmtk_times: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-receive-", dir=OUT) as tmp:
        work = Path(tmp)
        for r in range(args.rounds):
            # dcmtk storescp, accepting all transfer syntaxes, writing files (no fsync: it has none).
            port = free_port()
            out = work / f"storescp{r}"
            out.mkdir()
            scp = subprocess.Popen(
                [STORESCP, "+xa", "-aet", NODE_AET, "-od", str(out), str(port)],
                env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            try:
                assert wait_port(port), "storescp did not start"
                dcmtk_times.append(send(port, files, args.syntax, args.associations))
            finally:
                scp.send_signal(signal.SIGTERM)
                scp.wait(10)
            # The node: dicom-node serve, defaults (fsync on), long quiet time so no job work competes.
            port = free_port()
            storage = work / f"node{r}"
            cfg = node_config(storage, port, series={"quiet_seconds": 3600, "complete_on_release": False},
                              logging={"level": "WARNING"})  # fmt: skip
            if args.no_fsync:
                cfg["storage"]["fsync"] = False
            conf = write_config(work / f"node{r}.yaml", cfg)
            node = subprocess.Popen([str(REPO / ".venv" / "bin" / "dicom-node"), "serve", "--config", str(conf)])
            try:
                assert wait_port(port), "node did not start"
                node_times.append(send(port, files, args.syntax, args.associations))
            finally:
                node.send_signal(signal.SIGTERM)
                node.wait(60)
            stored = len(list((storage / "spool").rglob("*.dcm")))
            assert stored == len(files), f"node stored {stored} of {len(files)}"
            print(f"round {r + 1}: storescp {dcmtk_times[-1]:.3f} s   node {node_times[-1]:.3f} s")
    d, n = statistics.median(dcmtk_times), statistics.median(node_times)
    print(f"median storescp {d:.3f} s, median node {n:.3f} s, ratio storescp/node = {d / n:.2f} (target >= 1.0)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
