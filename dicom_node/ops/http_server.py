"""The node's HTTP surface (``http:`` in node.yaml): ``/healthz``, ``/readyz``, ``/metrics`` and the status page.

Read-only: GET (and HEAD) only, nothing here changes the node. :class:`OpsApp` maps a request to its answer
without sockets; :class:`OpsServer` serves it with the standard library's threading HTTP server, one thread per
request, on ``http.host:http.port`` (loopback by default).

Access: with ``http.access_token`` set, every request must carry the token, as ``Authorization: Bearer TOKEN``
(Prometheus' ``authorization`` block, curl, probes) or as the password of HTTP Basic authentication (a browser
asks for it; the user name is ignored). The settings refuse a non-loopback ``http.host`` without a token. The
comparison is constant-time. There is no TLS on this port: beyond the machine, put it behind the site's reverse
proxy or keep it on a management network.

Endpoints:

- ``/healthz``: 200 while the process answers, with version and uptime;
- ``/readyz``: 200 when every readiness check passes, else 503; the JSON body names each check, what it found,
  and the failed ones (:mod:`dicom_node.ops.health`);
- ``/metrics``: the node's registry in the Prometheus text format (:mod:`dicom_node.ops.metrics`);
- ``/``: the status page (:mod:`dicom_node.ops.status_page`); ``/jobs/<id>/preview.png``: a job's preview.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import re
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import CONTENT_TYPE_LATEST

from dicom_node import __version__
from dicom_node.db import Database
from dicom_node.errors import NodeError
from dicom_node.ops.health import Probes
from dicom_node.ops.metrics import NodeMetrics, StateCollector
from dicom_node.ops.status_page import NodeInfo, StatusPage
from dicom_node.receive.scp import StorageSCP
from dicom_node.receive.spool import Spool
from dicom_node.settings import HttpSection, Settings
from inference.triton_fleet import EndpointState

log = logging.getLogger(__name__)

SECURITY_HEADERS = (
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    (
        "Content-Security-Policy",
        "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; frame-ancestors 'none'",
    ),
)
"""On every answer: nothing cached, no script may run, the page cannot be framed."""

REQUEST_TIMEOUT_S = 30.0
"""A client that sends nothing for this long is dropped."""

_PREVIEW = re.compile(r"^/jobs/([0-9]{1,12})/preview\.png$")


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    content_type: str
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


def _json(status: int, body: dict[str, Any], headers: tuple[tuple[str, str], ...] = ()) -> Response:
    data = (json.dumps(body, indent=2, default=str) + "\n").encode()
    return Response(status, "application/json", data, headers)


def preview_path(results_dir: Path, job_id: int) -> Path:
    """Where the outputs stage puts a job's preview image."""
    return results_dir / f"job-{job_id}" / "preview.png"


class OpsApp:
    """Routes one GET to its answer."""

    def __init__(
        self,
        *,
        probes: Probes,
        metrics: NodeMetrics,
        status: Callable[[], dict[str, Any]],
        node_info: NodeInfo,
        results_dir: Path,
        access_token: str | None,
    ) -> None:
        self.probes = probes
        self.metrics = metrics
        self.status = status
        self.node_info = node_info
        self.results_dir = results_dir
        self._token = access_token
        self._page = StatusPage()

    def authorized(self, authorization: str | None) -> bool:
        """True when no token is configured, or the header carries it (Bearer, or Basic's password)."""
        if self._token is None:
            return True
        if not authorization:
            return False
        scheme, _, value = authorization.strip().partition(" ")
        given: str | None = None
        if scheme.lower() == "bearer":
            given = value.strip()
        elif scheme.lower() == "basic":
            try:
                given = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[2]
            except (binascii.Error, UnicodeDecodeError):
                return False
        if given is None:
            return False
        return hmac.compare_digest(given.encode("utf-8"), self._token.encode("utf-8"))

    def handle(self, target: str, authorization: str | None) -> Response:
        if not self.authorized(authorization):
            return _json(
                401,
                {"error": "this endpoint needs the access token (http.access_token): Authorization: Bearer TOKEN"},
                (("WWW-Authenticate", 'Basic realm="dicom-node", charset="UTF-8"'),),
            )
        path = urlsplit(target).path
        if path == "/healthz":
            return _json(200, self.probes.liveness())
        if path == "/readyz":
            readiness = self.probes.readiness()
            return _json(200 if readiness.ready else 503, readiness.as_json())
        if path == "/metrics":
            return Response(200, CONTENT_TYPE_LATEST, self.metrics.exposition())
        if path in ("/", "/index.html"):
            html = self._page.render(self.status(), self.probes.readiness(), self.node_info, self._preview_url)
            return Response(200, "text/html; charset=utf-8", html.encode("utf-8"))
        match = _PREVIEW.match(path)
        if match is not None:
            file = preview_path(self.results_dir, int(match.group(1)))
            if file.is_file():
                return Response(200, "image/png", file.read_bytes())
        return _json(404, {"error": f"no such page: {path}"})

    def _preview_url(self, job_id: int) -> str | None:
        return f"/jobs/{job_id}/preview.png" if preview_path(self.results_dir, job_id).is_file() else None


class _Handler(BaseHTTPRequestHandler):
    server_version = f"dicom-node/{__version__}"
    sys_version = ""
    timeout = REQUEST_TIMEOUT_S

    def __init__(self, *args: Any, app: OpsApp, **kwargs: Any) -> None:
        self.app = app
        super().__init__(*args, **kwargs)

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _answer(self, *, send_body: bool) -> None:
        try:
            rsp = self.app.handle(self.path, self.headers.get("Authorization"))
        except Exception as exc:  # a broken page must not take the server down; say what broke
            log.exception("HTTP %s failed", self.path)
            rsp = _json(500, {"error": f"{type(exc).__name__}: {exc}"})
        if rsp.status == 401:
            log.warning("HTTP %s from %s refused: no or wrong access token", self.path, self.client_address[0])
        self.send_response(rsp.status)
        self.send_header("Content-Type", rsp.content_type)
        self.send_header("Content-Length", str(len(rsp.body)))
        for name, value in (*SECURITY_HEADERS, *rsp.headers):
            self.send_header(name, value)
        self.end_headers()
        if send_body:
            self.wfile.write(rsp.body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("HTTP %s " + format, self.client_address[0], *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class OpsServer:
    """Serves an :class:`OpsApp` on ``http.host:http.port`` in a thread of its own."""

    def __init__(self, http: HttpSection, app: OpsApp) -> None:
        self.http = http
        self.app = app
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        """Listen and serve; returns the bound port."""
        try:
            family = socket.getaddrinfo(self.http.host, self.http.port, type=socket.SOCK_STREAM)[0][0]
        except OSError as exc:
            raise NodeError(f"http: host {self.http.host!r} cannot be resolved: {exc}") from exc
        server_class = type("_OpsServer", (_Server,), {"address_family": family})

        def handler(*args: Any, **kwargs: Any) -> _Handler:
            return _Handler(*args, app=self.app, **kwargs)

        try:
            self._server = server_class((self.http.host, self.http.port), handler)
        except OSError as exc:
            raise NodeError(
                f"http: cannot listen on {self.http.host}:{self.http.port}: {exc.strerror or exc} "
                "(choose another http.port, or set http.enabled: false)"
            ) from exc
        port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)
        self._thread.start()
        log.info(
            "HTTP endpoints listening",
            extra={"host": self.http.host, "port": port, "token": self.http.access_token is not None},
        )
        return port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None


def build_ops_server(
    settings: Settings,
    *,
    db: Database,
    spool: Spool,
    scp: StorageSCP,
    backend_problem: Callable[[], str | None],
    metrics: NodeMetrics,
    status: Callable[[], dict[str, Any]],
    backend_endpoints: Callable[[], Sequence[EndpointState]] = tuple,
) -> OpsServer:
    """The HTTP surface on the running node's parts: its probes, its metrics (with the figures read from the
    database at scrape time) and the status page (``status``: what ``dicom-node status --json`` prints, read
    afresh for each page)."""
    metrics.watch(StateCollector(db, settings.storage.dir, backend_problem, backend_endpoints))
    probes = Probes(
        db=db, spool=spool, listener_problem=scp.listener_problem, backend_problem=backend_problem,
        listeners=scp.listeners,
    )  # fmt: skip
    token = settings.http.access_token
    app = OpsApp(
        probes=probes,
        metrics=metrics,
        status=status,
        node_info=NodeInfo(
            ae_title=settings.node.ae_title,
            version=__version__,
            listeners=scp.listeners(),
            storage_dir=str(settings.storage.dir),
            destinations=len(settings.destinations),
        ),
        results_dir=settings.storage.dir / "results",
        access_token=None if token is None else token.get_secret_value(),
    )
    return OpsServer(settings.http, app)
