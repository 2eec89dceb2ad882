"""DICOM TLS against dcmtk's own TLS (Debian's dcmtk is built with OpenSSL), with certificates the test makes;
calling AE titles bound to hosts; the managed tritonserver on loopback only.

- ``storescu +tls`` -> the node's TLS port (client certificate required): stored; a plain association to that
  port, a client certificate another CA signed, and none at all are refused, recorded and counted, and the node
  serves on.
- the node's outbox -> ``storescp +tls`` (which requires our client certificate): delivered; a destination whose
  certificate our CA list does not verify is not sent to.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from dicom_node.daemon import Node
from dicom_node.export.outbox import Outbox
from dicom_node.export.scu import send
from dicom_node.inference_runtime import open_backend
from dicom_node.ops.metrics import NodeMetrics
from dicom_node.settings import Destination, DestinationTls, ExportSection
from dicom_node.types import SegArtifact, SendStatus
from inference.errors import BackendUnavailable
from inference.spec import InferenceSpec
from tests import factories
from tests.certs import Pki, make_pki
from tests.dicom_peers import wait_port
from tests.dimse import DCMTK_ENV, ECHOSCU, NODE_AET, STORESCP, STORESCU, echoscu, free_port, settings_for, wait_for
from tests.processors import ReconstructingProcessor, running_node

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def few_slices(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> factories.WrittenSeries:
    image = factories.read_volume(shared_data / "chest_ct_volumes" / "lung1_image.nrrd")
    return factories.write_ct_series(image[:, :, :3], tmp_path_factory.mktemp("tls_series"), tag="tls-lung1")


def events(node: Node, kind: str) -> list[Any]:
    assert node.db is not None
    return node.db.query("SELECT * FROM events WHERE kind=? ORDER BY id", (kind,))


def storescu_tls(port: int, files: list[Path], *tls: str, aet: str = "STORESCU") -> subprocess.CompletedProcess[str]:
    cmd = [STORESCU, "-aet", aet, "-aec", NODE_AET, *tls, "127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(cmd, env=DCMTK_ENV, capture_output=True, text=True, timeout=60)


def test_tls_listener_with_dcmtk_storescu(tmp_path: Path, pki: Pki, few_slices: factories.WrittenSeries) -> None:
    tls = {
        "port": free_port(),
        "certificate": str(pki.node.certificate),
        "private_key": str(pki.node.private_key),
        "ca_certificates": str(pki.ca),
        "require_client_certificate": True,
    }
    with running_node(tmp_path / "var", node={"tls": tls}) as node:
        assert node.tls_port == tls["port"] and node.port != node.tls_port
        trust = ["+cf", str(pki.ca)]
        ok = storescu_tls(node.tls_port, few_slices.files, "+tls", str(pki.client.private_key),
                          str(pki.client.certificate), *trust)  # fmt: skip
        assert ok.returncode == 0, ok.stderr
        assert node.db is not None
        stored = node.db.query("SELECT count(*) AS n FROM instances")[0]["n"]
        assert stored == len(few_slices.files)
        assert node.metrics.associations_accepted.labels("tls")._value.get() == 1

        # 1. A plain association to the TLS port.
        plain = storescu_tls(node.tls_port, few_slices.files[:1])
        assert plain.returncode != 0
        # 2. A client certificate the node's CA did not sign.
        rogue = storescu_tls(node.tls_port, few_slices.files[:1], "+tls", str(pki.rogue.private_key),
                             str(pki.rogue.certificate), *trust)  # fmt: skip
        assert rogue.returncode != 0
        # 3. No client certificate at all, while one is required.
        anonymous = storescu_tls(node.tls_port, few_slices.files[:1], "+tla", *trust)
        assert anonymous.returncode != 0

        refused = wait_for(lambda: len(events(node, "tls_refused")) >= 3 and events(node, "tls_refused"), 10)
        assert refused, events(node, "tls_refused")
        reasons = [r["reason"] for r in refused]
        assert all(r.startswith("TLS connection from 127.0.0.1:") for r in reasons), reasons
        assert "not TLS" in reasons[0], reasons
        assert "certificate verify failed: unable to get local issuer certificate" in reasons[1], reasons
        assert "peer did not return a certificate (node.tls.require_client_certificate" in reasons[2], reasons
        assert node.metrics.associations_rejected.labels("tls_handshake")._value.get() == 3
        assert node.db.query("SELECT count(*) AS n FROM instances")[0]["n"] == stored
        # Refused clients hold no association slot, and both listeners still serve.
        assert wait_for(lambda: not node.scp or not node.scp.ae.active_associations, 5)
        assert echoscu(node.port)
        echo = subprocess.run(
            [ECHOSCU, "-aec", NODE_AET, "+tls", str(pki.client.private_key), str(pki.client.certificate), *trust,
             "127.0.0.1", str(node.tls_port)],
            env=DCMTK_ENV, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert echo.returncode == 0, echo.stderr


def test_tls_only_closes_the_plain_port(tmp_path: Path, pki: Pki, few_slices: factories.WrittenSeries) -> None:
    plain = free_port()
    tls = {"port": free_port(), "certificate": str(pki.node.certificate), "private_key": str(pki.node.private_key),
           "require_client_certificate": False, "only": True}  # fmt: skip
    settings = settings_for(tmp_path / "var", plain, node={"tls": tls})
    node = Node(settings, processor=ReconstructingProcessor(settings))
    assert node.start() == tls["port"] == node.tls_port
    try:
        with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", plain), timeout=5):
            pass
        # No client certificate needed here: dcmtk's anonymous TLS client, verifying the node against the CA.
        ok = storescu_tls(node.tls_port, few_slices.files[:1], "+tla", "+cf", str(pki.ca))
        assert ok.returncode == 0, ok.stderr
        assert node.scp is not None and node.scp.listener_problem() is None
    finally:
        node.stop(grace_s=5)


@contextlib.contextmanager
def storescp_tls(out: Path, pki: Pki, *, require_client_certificate: bool = True) -> Iterator[int]:
    """dcmtk storescp with TLS, its own certificate signed by the test CA; ``-rc``: our certificate required."""
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [STORESCP, "-aet", "PACS", "+tls", str(pki.pacs.private_key), str(pki.pacs.certificate), "+cf", str(pki.ca),
           "-rc" if require_client_certificate else "-vc", "--output-directory", str(out), str(port)]  # fmt: skip
    log = open(out.parent / f"storescp-tls-{port}.log", "wb")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=DCMTK_ENV)
    log.close()
    try:
        wait_port(port)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def test_outbox_sends_over_tls_to_dcmtk_storescp(tmp_path: Path, pki: Pki, shared_data: Path) -> None:
    seg = shared_data / "seg_reference" / "dcmqi_ct3slice" / "liver.dcm"
    ds = pydicom.dcmread(seg, stop_before_pixels=True)
    with storescp_tls(tmp_path / "pacs", pki) as port:
        ours = DestinationTls(
            ca_certificates=pki.ca, certificate=pki.client.certificate, private_key=pki.client.private_key
        )
        dest = Destination(ae_title="PACS", host="127.0.0.1", port=port, tls=ours)
        metrics = NodeMetrics()
        outbox = Outbox(
            tmp_path / "state.sqlite3", ExportSection(), calling_ae_title=NODE_AET, destinations=[dest],
            metrics=metrics,
        )  # fmt: skip
        artifact = SegArtifact(seg, str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), str(ds.StudyInstanceUID), 1)
        with outbox:
            outbox.enqueue(1, artifact)
            outcome = outbox.wait_settled(1, 30)
        assert outcome is not None and outcome.state == "delivered", outcome
        received = list((tmp_path / "pacs").iterdir())
        assert len(received) == 1
        assert pydicom.dcmread(received[0]).SOPInstanceUID == ds.SOPInstanceUID
        key = f"PACS@127.0.0.1:{port}"
        assert metrics.export_attempts.labels(key)._value.get() == 1
        assert metrics.export_failures.labels(key)._value.get() == 0

        # Without our client certificate storescp refuses us; with the rogue CA as our trust, we refuse it.
        without_cert = dest.model_copy(update={"tls": DestinationTls(ca_certificates=pki.ca)})
        untrusted = dest.model_copy(update={"tls": DestinationTls(ca_certificates=pki.rogue.certificate)})
        for bad in (without_cert, untrusted):
            result = send(seg, bad, NODE_AET, 10)
            assert result.status is SendStatus.RETRY and "TLS" in (result.reason or ""), result
        assert len(list((tmp_path / "pacs").iterdir())) == 1


def test_calling_ae_titles_bound_to_hosts(tmp_path: Path, few_slices: factories.WrittenSeries) -> None:
    # Every connection here comes from 127.0.0.1: PACS is bound elsewhere, CT1 to loopback.
    callers = [{"ae_title": "PACS", "hosts": ["10.9.9.9/32"]}, {"ae_title": "CT1", "hosts": ["127.0.0.0/8"]}]
    with running_node(tmp_path / "var", node={"allowed_callers": callers}) as node:
        bound_elsewhere = storescu_tls(node.port, few_slices.files[:1], aet="PACS")
        assert bound_elsewhere.returncode != 0
        assert "Calling AE Title Not Recognized" in bound_elsewhere.stderr, bound_elsewhere.stderr
        rejected = wait_for(lambda: events(node, "association_rejected"), 5)  # recorded once the answer is out
        assert len(rejected) == 1
        assert rejected[0]["calling_ae_title"] == "PACS"
        assert "'PACS' from 127.0.0.1 is bound to 10.9.9.9/32 (node.allowed_callers)" in rejected[0]["reason"]
        assert node.metrics.associations_rejected.labels("caller_host")._value.get() == 1

        unknown = storescu_tls(node.port, few_slices.files[:1], aet="STRANGER")
        assert unknown.returncode != 0
        assert (
            "not in node.allowed_calling_ae_titles or node.allowed_callers"
            in events(node, "association_rejected")[-1]["reason"]
        )
        assert node.metrics.associations_rejected.labels("calling_ae_title")._value.get() == 1

        ok = storescu_tls(node.port, few_slices.files, aet="CT1")
        assert ok.returncode == 0, ok.stderr
        assert node.db is not None
        assert node.db.query("SELECT count(*) AS n FROM instances")[0]["n"] == len(few_slices.files)
        assert node.metrics.instances_received._value.get() == len(few_slices.files)


# -- the managed tritonserver -----------------------------------------------------------------------------------
def _tritonservers() -> list[int]:
    """tritonserver processes this test process started (children: start_new_session keeps the parent)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            if comm == "tritonserver" and ppid == os.getpid():
                pids.append(int(entry.name))
    return pids


def _listening(pid: int) -> set[str]:
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    return {line.split()[3] for line in out.splitlines() if f"pid={pid}," in line}


def _loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.strip("[]"))
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _own_address() -> str | None:
    """An address of this machine that is not loopback (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))
        except OSError:
            return None
        address = str(s.getsockname()[0])
    return None if address.startswith("127.") else address


def test_managed_triton_listens_on_loopback_only(
    tmp_path: Path, model_repository: Path, inference_spec: InferenceSpec
) -> None:
    ports = [free_port() for _ in range(3)]
    settings = settings_for(
        tmp_path / "var", free_port(),
        inference={"backend": "triton", "model_repository": str(model_repository),
                   "triton": {"url": f"127.0.0.1:{ports[0]}", "managed": True, "http_port": ports[1],
                              "metrics_port": ports[2], "startup_timeout_s": 120}},
    )  # fmt: skip
    others = set(_tritonservers())  # the session's own tritonserver may be running: only the new one counts
    with open_backend(settings, inference_spec):
        (pid,) = set(_tritonservers()) - others
        addresses = _listening(pid)
        assert {a.rsplit(":", 1)[1] for a in addresses} >= {str(p) for p in ports}, addresses
        assert all(_loopback(a.rsplit(":", 1)[0]) for a in addresses), addresses  # gRPC: [::ffff:127.0.0.1]
    assert not set(_tritonservers()) - others

    own = _own_address()
    if own is None:
        pytest.skip("this machine has no non-loopback address")
    remote = settings.model_copy(
        update={"inference": settings.inference.model_copy(update={"triton": settings.inference.triton.model_copy(
            update={"url": f"{own}:{free_port()}"})})}
    )  # fmt: skip
    with (
        pytest.raises(BackendUnavailable, match="not a loopback address, so the node does not start one"),
        open_backend(remote, inference_spec),
    ):
        pass
    assert not set(_tritonservers()) - others
