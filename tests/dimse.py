"""Helpers for tests that talk DIMSE to the node: free ports, dcmtk tools, a pynetdicom SCU, node settings."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydicom.dataset import Dataset
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from dicom_node.settings import Settings

STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"
STORESCP = "/usr/bin/storescp"
NODE_AET = "COVIDSEG"
REPO_ROOT = Path(__file__).resolve().parent.parent
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(n: int) -> list[int]:
    """``n`` different free loopback ports (the sockets are held open together, so no two are the same)."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [int(s.getsockname()[1]) for s in sockets]
    for s in sockets:
        s.close()
    return ports


def node_config(storage: Path, port: int, /, **sections: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "node": {"ae_title": NODE_AET, "host": "127.0.0.1", "port": port},
        "storage": {"dir": str(storage), "min_free_bytes": 0},
        "series": {"quiet_seconds": 30, "poll_interval_s": 0.1},
        "logging": {"level": "INFO"},
        # Absolute, so a config written to a temp folder still finds the project's model spec. Tests that run
        # inference point model_repository at the `model_repository` fixture.
        "inference": {
            "backend": "onnxruntime",
            "config": str(REPO_ROOT / "config" / "config_inference.json"),
            "model_repository": str(REPO_ROOT / "models"),
        },
        # The node sends an SR beside the SEG by default; the reception, export and fault tests count the objects
        # a destination receives and look at the SEG alone, so here it is off. tests/integration/test_outputs.py
        # turns the SR and the overlay on.
        "sr": {"enabled": False},
    }
    for name, values in sections.items():
        base = cfg.get(name, {})
        cfg[name] = {**base, **values} if isinstance(base, dict) and isinstance(values, dict) else values
    return cfg


def settings_for(storage: Path, port: int, /, **sections: Any) -> Settings:
    return Settings.model_validate(node_config(storage, port, **sections))


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def storescu(
    port: int, files: Sequence[Path], *, aet: str = "STORESCU", propose: str = "-xs", extra: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """dcmtk storescu, one association for all files; ``propose`` picks the transfer syntax option."""
    cmd = [STORESCU, "-aet", aet, "-aec", NODE_AET, propose, "-R", *extra, "127.0.0.1", str(port)]
    cmd += [str(f) for f in files]
    return subprocess.run(cmd, env=DCMTK_ENV, capture_output=True, text=True, timeout=120)


def echoscu(port: int, aet: str = "ECHOSCU") -> bool:
    r = subprocess.run(
        [ECHOSCU, "-aet", aet, "-aec", NODE_AET, "127.0.0.1", str(port)],
        env=DCMTK_ENV, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    return r.returncode == 0


def wait_for(predicate: Any, timeout: float = 20.0, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return predicate()


def wait_port(port: int, timeout: float = 30.0) -> bool:
    def up() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False

    return bool(wait_for(up, timeout, 0.1))


class SCU:
    """A pynetdicom SCU that can send what dcmtk refuses to (empty UIDs, hostile UIDs) and abort on demand."""

    def __init__(self, port: int, *, aet: str = "PYSCU", transfer_syntaxes: Sequence[str] | None = None) -> None:
        self.ae = AE(ae_title=aet)
        # 30 s, as PACS commonly wait: in one full CI run on 2 cores a C-STORE response took over 10 s
        # (test_sigterm_exits_zero_with_state_persisted, 5th store; the node acknowledges only after fsync, the likely
        # but unconfirmed cause).
        self.ae.acse_timeout = 30
        self.ae.dimse_timeout = 30
        self.ae.network_timeout = 30
        from dicom_node.receive.scp import TRANSFER_SYNTAXES

        for ts in transfer_syntaxes or TRANSFER_SYNTAXES:  # one context per syntax: the SCP picks one per context
            self.ae.add_requested_context(CTImageStorage, ts)
        self.ae.add_requested_context(Verification)
        self.assoc = self.ae.associate("127.0.0.1", port, ae_title=NODE_AET)
        if not self.assoc.is_established:
            raise ConnectionError(f"association to port {port} not established")

    def send(self, item: Dataset | Path) -> int:
        """C-STORE a dataset, or a file path sent as raw bytes (no re-encoding); returns the status (-1: none)."""
        if isinstance(item, Path):
            _config.STORE_SEND_CHUNKED_DATASET = True
            try:
                rsp = self.assoc.send_c_store(item)
            finally:
                _config.STORE_SEND_CHUNKED_DATASET = False
        else:
            rsp = self.assoc.send_c_store(item)
        return int(rsp.Status) if rsp is not None and "Status" in rsp else -1

    def release(self) -> None:
        self.assoc.release()

    def abort(self) -> None:
        self.assoc.abort()
