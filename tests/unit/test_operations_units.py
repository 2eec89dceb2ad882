"""Issue 19's pieces one by one, no network: the settings that guard the HTTP port, TLS and callers; the caller
policy; the access token check; the status page's escaping; a node's own metrics registry; the managed Triton's
loopback addresses."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dicom_node.ops.health import Check, Readiness
from dicom_node.ops.http_server import OpsApp
from dicom_node.ops.metrics import NodeMetrics
from dicom_node.ops.status_page import NodeInfo, StatusPage
from dicom_node.receive.callers import CallerPolicy
from dicom_node.settings import ConfigError, NodeSection, Settings, load_settings
from inference.triton_server import ManagedTriton, TritonDistribution

TOKEN = "s3cret-token-0123456789"


def _load(tmp_path: Path, text: str) -> Settings:
    path = tmp_path / "node.yaml"
    path.write_text(text, encoding="utf-8")
    return load_settings(path, environ={})


# -- settings -------------------------------------------------------------------------------------------------
def test_http_beyond_loopback_needs_a_token(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"http: .*'0\.0\.0\.0' is not a loopback address: set http.access_token"):
        _load(tmp_path, "http: {enabled: true, host: 0.0.0.0}")
    s = _load(tmp_path, f"http: {{enabled: true, host: 0.0.0.0, access_token: {TOKEN}}}")
    assert s.http.access_token is not None and s.http.access_token.get_secret_value() == TOKEN
    assert TOKEN not in repr(s)  # a secret, not printed with the settings
    assert _load(tmp_path, "http: {enabled: true, host: '::1'}").http.host == "::1"
    with pytest.raises(ConfigError, match=r"http\.access_token: .*at least 16 characters"):
        _load(tmp_path, "http: {enabled: true, access_token: short}")


def test_tls_settings_name_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"node\.tls: .*ca_certificates is not set"):
        _load(tmp_path, "node: {tls: {port: 2762, certificate: c.pem, private_key: k.pem}}")
    with pytest.raises(ConfigError, match=r"destinations\.0\.tls: .*certificate and private_key go together"):
        _load(
            tmp_path, "destinations: [{ae_title: P, host: h, port: 1, tls: {ca_certificates: ca.pem, certificate: c}}]"
        )
    s = _load(
        tmp_path,
        "node: {tls: {port: 2762, certificate: c.pem, private_key: k.pem, ca_certificates: ca.pem}}\n"
        "destinations: [{ae_title: P, host: h, port: 1, tls: {ca_certificates: ../ca.pem}}]\n",
    )
    assert s.node.tls is not None and s.node.tls.certificate == tmp_path / "c.pem"  # relative to node.yaml
    assert s.destinations[0].tls is not None
    assert s.destinations[0].tls.ca_certificates == (tmp_path.parent / "ca.pem").resolve()


def test_a_missing_certificate_file_fails_at_start_naming_it(tmp_path: Path) -> None:
    from dicom_node.tls import check_configuration

    s = _load(tmp_path, "node: {tls: {port: 2762, certificate: c.pem, private_key: k.pem, ca_certificates: ca.pem}}")
    with pytest.raises(ConfigError, match=r"node.tls: cannot load certificate .*c\.pem"):
        check_configuration(s)


def test_allowed_callers_take_addresses_and_networks(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"node.allowed_callers.0.hosts.0"):
        _load(tmp_path, "node: {allowed_callers: [{ae_title: PACS, hosts: [pacs.example.org]}]}")
    with pytest.raises(ConfigError, match=r"node.allowed_callers.0.hosts"):
        _load(tmp_path, "node: {allowed_callers: [{ae_title: PACS, hosts: []}]}")


# -- caller policy --------------------------------------------------------------------------------------------
def _policy(**node: Any) -> CallerPolicy:
    return CallerPolicy.from_settings(NodeSection.model_validate(node))


def test_caller_policy_binds_titles_to_hosts() -> None:
    p = _policy(
        allowed_calling_ae_titles=["ANY", "PACS"],
        allowed_callers=[
            {"ae_title": "PACS", "hosts": ["10.9.9.9"]},
            {"ae_title": "PACS", "hosts": ["192.168.0.0/16"]},
            {"ae_title": "CT1", "hosts": ["127.0.0.0/8", "fd00::/8"]},
        ],
    )
    assert p.known == {"ANY", "PACS", "CT1"}
    assert p.host_refusal("ANY", "127.0.0.1") is None  # only in the plain list: any host
    assert p.host_refusal("PACS", "10.9.9.9") is None
    assert p.host_refusal("PACS", "192.168.4.5") is None  # entries for one title add up
    why = p.host_refusal("PACS", "127.0.0.1")
    assert why is not None and "'PACS' from 127.0.0.1 is bound to 10.9.9.9/32, 192.168.0.0/16" in why
    assert p.host_refusal("CT1 ", "::ffff:127.0.0.5") is None  # IPv4 seen through a dual-stack socket
    assert p.host_refusal("CT1", "fd00::12") is None
    assert p.host_refusal("CT1", "10.0.0.1") is not None
    assert _policy().known == frozenset()  # no list: anyone


# -- access token ---------------------------------------------------------------------------------------------
def _app(token: str | None) -> OpsApp:
    return OpsApp(
        probes=None,  # type: ignore[arg-type]  # not reached by authorized()
        metrics=NodeMetrics(),
        status=dict,
        node_info=NodeInfo("COVIDSEG", "0", "", "", 0),
        results_dir=Path("/nonexistent"),
        access_token=token,
    )


def test_the_access_token_is_a_bearer_token_or_a_basic_password() -> None:
    app = _app(TOKEN)
    basic = base64.b64encode(f"anyone:{TOKEN}".encode()).decode()
    assert app.authorized(f"Bearer {TOKEN}")
    assert app.authorized(f"bearer   {TOKEN}")
    assert app.authorized(f"Basic {basic}")
    for bad in (None, "", "Bearer", f"Bearer {TOKEN}x", f"Token {TOKEN}", "Basic !!!", f"Basic {TOKEN}"):
        assert not app.authorized(bad), bad
    rsp = app.handle("/metrics", None)
    assert rsp.status == 401 and ("WWW-Authenticate", 'Basic realm="dicom-node", charset="UTF-8"') in rsp.headers
    assert _app(None).authorized(None)


# -- status page ----------------------------------------------------------------------------------------------
def test_the_status_page_escapes_what_senders_wrote() -> None:
    hostile = '<script>alert("x")</script>'
    status = {
        "series": [{"series_instance_uid": hostile, "modality": "CT", "instance_count": 3, "run": 1,
                    "state": "processed", "first_arrival": 1.0, "last_arrival": 2.0}],
        "jobs": [{"id": 7, "series_instance_uid": "1.2.3", "run": 1, "state": "failed", "attempts": 1,
                  "reason": hostile, "failure_stage": "input", "created_at": 1.0, "updated_at": 4.5}],
        "exports": [],
        "events": [{"at": 3.0, "kind": "instance_refused", "calling_ae_title": "<b>AE</b>", "reason": hostile}],
    }  # fmt: skip
    readiness = Readiness((Check("scp", True, "listening"), Check("backend", False, f"down: {hostile}")))
    html = StatusPage().render(status, readiness, NodeInfo("COVIDSEG", "0.1", "port 1", "/var", 0), lambda _: None)
    assert "<script" not in html and "<b>AE" not in html
    # series UID (twice: text and attribute), job reason, event reason, readiness detail
    assert html.count("&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;") == 5
    assert 'data-job-id="7" data-state="failed"' in html and "3.5 s" in html
    assert 'data-ready="false"' in html


# -- metrics --------------------------------------------------------------------------------------------------
def _samples(metrics: NodeMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics.exposition().decode())
        for s in family.samples
    }


def test_each_node_counts_on_its_own_registry() -> None:
    a, b = NodeMetrics(), NodeMetrics()
    a.instances_received.inc(3)
    a.instances_refused.labels("invalid_dataset").inc()
    a.export_attempt("PACS@h:1", False, 0.2)
    sa, sb = _samples(a), _samples(b)
    assert sa[("dicom_node_instances_received_total", ())] == 3
    assert sb[("dicom_node_instances_received_total", ())] == 0
    assert sa[("dicom_node_instances_refused_total", (("reason", "invalid_dataset"),))] == 1
    assert sa[("dicom_node_export_failures_total", (("destination", "PACS@h:1"),))] == 1
    assert sa[("dicom_node_stage_duration_seconds_count", (("stage", "export"),))] == 1
    assert sb[("dicom_node_associations_rejected_total", (("reason", "caller_host"),))] == 0  # present before use


# -- managed Triton -------------------------------------------------------------------------------------------
def test_a_managed_triton_binds_every_endpoint_to_loopback(tmp_path: Path) -> None:
    from dicom_node.inference_runtime import managed_server_options
    from dicom_node.settings import TritonSection

    options, url = managed_server_options(TritonSection(url="localhost:9001"), "m")
    assert url == "127.0.0.1:9001" and options.address == "127.0.0.1"
    dist = TritonDistribution(Path("tritonserver"), Path("py"), Path("stub"), Path("libs"))
    cmd = ManagedTriton(tmp_path, options).command(tmp_path / "backends", dist)
    addresses = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in cmd if a.endswith("-address=127.0.0.1")}
    assert set(addresses) == {"--http-address", "--grpc-address", "--metrics-address"}
    assert not [a for a in cmd if "-address=" in a and not a.endswith("=127.0.0.1")]


def test_the_deploy_examples_use_only_metrics_the_node_exports(tmp_path: Path, repo_root: Path) -> None:
    from dicom_node.db import Database
    from dicom_node.ops.metrics import StateCollector

    db = Database(tmp_path / "state.sqlite3")
    try:
        m = NodeMetrics()
        m.watch(StateCollector(db, tmp_path, lambda: None))
        m.known_destinations(["PACS@h:1"])
        m.inference_request_seconds.labels("triton")
        exported = {s.name for f in text_string_to_metric_families(m.exposition().decode()) for s in f.samples}
    finally:
        db.close()
    dashboard = json.loads((repo_root / "deploy" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", ())]
    assert len(exprs) >= 15
    rules = (repo_root / "deploy" / "prometheus-rules.yml").read_text()
    used = set(re.findall(r"dicom_node_[a-z_]+", " ".join(exprs) + rules))
    assert used and used <= exported, used - exported
