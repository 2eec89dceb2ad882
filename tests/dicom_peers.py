"""Real DICOM peers started by tests on free loopback ports: dcmtk storescp, Orthanc, and a pynetdicom SCP that
answers a chosen C-STORE status."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import SegmentationStorage  # type: ignore[attr-defined]

from tests.dimse import STORESCP, STORESCU, free_port


def orthanc_binary() -> str | None:
    for candidate in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc"):
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("Orthanc")


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def dcmtk_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


@dataclass
class StoreSCP:
    """dcmtk storescp writing what it receives into ``out_dir``; its verbose log counts the C-STORE requests."""

    port: int
    out_dir: Path
    ae_title: str = "STORESCP"
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(default_factory=Path)

    def start(self) -> StoreSCP:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.out_dir.parent / f"storescp-{self.port}.log"
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [STORESCP, "-v", "-aet", self.ae_title, "--output-directory", str(self.out_dir), str(self.port)],
            stdout=log, stderr=subprocess.STDOUT, env=dcmtk_env(),
        )  # fmt: skip
        log.close()
        wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def received_files(self) -> list[Path]:
        return sorted(p for p in self.out_dir.iterdir() if p.is_file()) if self.out_dir.exists() else []

    def store_requests(self) -> int:
        return self._log().count("Received Store Request")

    def associations(self) -> int:
        return self._log().count("Association Acknowledged")  # "Received" counts bare TCP probes too

    def _log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@contextlib.contextmanager
def storescp(out_dir: Path, port: int | None = None) -> Iterator[StoreSCP]:
    scp = StoreSCP(port or free_port(), out_dir).start()
    try:
        yield scp
    finally:
        scp.stop()


@dataclass
class StatusSCP:
    """A pynetdicom storage SCP that answers every C-STORE with ``status`` and counts the requests and the
    associations; with ``delay_s``, each answer comes that long after the request (a slow archive); with
    ``abort_on``, it aborts the association instead of answering that request (counted from 1), once."""

    status: int
    port: int = field(default_factory=free_port)
    ae_title: str = "STATUSSCP"
    received: list[str] = field(default_factory=list)
    server: Any = None
    delay_s: float = 0.0
    abort_on: int | None = None
    associations: int = 0

    def start(self) -> StatusSCP:
        ae = AE(ae_title=self.ae_title)
        ae.add_supported_context(SegmentationStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        lock = threading.Lock()

        requests = 0

        def handle(event: Any) -> int | None:
            nonlocal requests
            with lock:
                requests += 1
                if requests == self.abort_on:
                    event.assoc.abort()
                    return None
                self.received.append(str(event.request.AffectedSOPInstanceUID))
            if self.delay_s:
                time.sleep(self.delay_s)
            return self.status

        def accepted(_event: Any) -> None:
            with lock:
                self.associations += 1

        handlers: list[Any] = [(evt.EVT_C_STORE, handle), (evt.EVT_ACCEPTED, accepted)]
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None


@dataclass
class Orthanc:
    """An Orthanc of the test's own: free DICOM and HTTP ports, storage in tmp, no authentication."""

    work: Path
    dicom_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    ae_title: str = "ORTHANC"
    proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> Orthanc:
        binary = orthanc_binary()
        if binary is None:
            raise FileNotFoundError("Orthanc")
        self.work.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "dicom-node-test",
            "StorageDirectory": str(self.work / "storage"),
            "IndexDirectory": str(self.work / "index"),
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": True,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "HttpServerEnabled": True,
            "DicomServerEnabled": True,
            "Plugins": [],
            "StorageCompression": False,
        }
        cfg = self.work / "orthanc.json"
        cfg.write_text(json.dumps(config, indent=2))
        log = open(self.work / "orthanc.log", "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen([binary, str(cfg)], stdout=log, stderr=subprocess.STDOUT, env=dcmtk_env())
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(self.work / 'orthanc.log').read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                self.get("/system")
                wait_port(self.dicom_port, 5)
                return self
            time.sleep(0.2)
        raise TimeoutError("Orthanc did not answer /system")

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as rsp:
            return json.loads(rsp.read())

    def post(self, path: str, body: Any) -> Any:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}", data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(req, timeout=10) as rsp:
            return json.loads(rsp.read())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def storescu(files: list[Path], port: int, called: str) -> None:
    """dcmtk storescu: send files on one association."""
    subprocess.run(
        [STORESCU, "-aec", called, "127.0.0.1", str(port), *map(str, files)],
        check=True, capture_output=True, env=dcmtk_env(), timeout=120,
    )  # fmt: skip
