"""Opening the configured inference backend: the bridge from the node's settings to ``inference``'s backends.

``open_backend`` is the only place that decides how a job reaches its model:

- ``onnxruntime``: the ONNX file of the model repository, in process;
- ``triton``: the server at ``inference.triton.url`` when it answers; else, when ``triton.managed`` is true and
  the URL names this machine's loopback, a tritonserver the node starts itself on ``inference.model_repository``
  (stopped again when the context closes); else ``BackendUnavailable`` naming the URL.

The backend is always ``check()``-ed before it is handed out, so a wrong model fails before the first window.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from dicom_node.settings import Settings, TritonSection
from inference.backend import Backend
from inference.errors import BackendUnavailable, ModelMismatch
from inference.spec import InferenceSpec
from inference.triton_server import ManagedTriton, TritonServerOptions, is_local_host, split_url

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 2.0
"""How long to wait for an answer at the Triton URL before deciding nothing runs there."""


def managed_server_options(triton: TritonSection, model: str) -> tuple[TritonServerOptions, str]:
    """TritonServerOptions for a node-started server, and the URL the node then uses.

    The server listens on loopback; its port for the configured protocol is the URL's port (so the node reaches
    what it started), the other ports come from the settings.
    """
    _, url_port = split_url(triton.url)
    http_port, grpc_port = triton.http_port, triton.grpc_port
    if url_port is not None:
        if triton.protocol == "grpc":
            grpc_port = url_port
        else:
            http_port = url_port
    options = TritonServerOptions(
        http_port=http_port,
        grpc_port=grpc_port,
        metrics_port=triton.metrics_port,
        address="127.0.0.1",
        startup_timeout_s=triton.startup_timeout_s,
        models=(model,),
    )
    port = grpc_port if triton.protocol == "grpc" else http_port
    return options, f"127.0.0.1:{port}"


@contextmanager
def open_backend(settings: Settings, spec: InferenceSpec, backend_name: str | None = None) -> Iterator[Backend]:
    """A checked backend for ``spec``; closes it (and any Triton it started) on exit.

    ``backend_name`` overrides ``settings.inference.backend``.
    """
    name = backend_name or settings.inference.backend
    repository = settings.inference.model_repository
    with ExitStack() as stack:
        backend: Backend
        if name == "onnxruntime":
            from inference.onnx_backend import OnnxRuntimeBackend

            backend = OnnxRuntimeBackend(
                spec, spec.model.onnx_path(repository), settings.inference.onnxruntime.intra_op_threads
            )
        elif name == "triton":
            backend = _triton_backend(settings.inference.triton, spec, stack, repository)
        else:
            raise BackendUnavailable(f"unknown inference backend {name!r} (triton or onnxruntime)")
        stack.callback(backend.close)
        backend.check()
        yield backend


def _triton_fleet(triton: TritonSection, spec: InferenceSpec) -> Backend:
    """``inference.triton.urls``: one backend over several servers. The node starts none of them; an endpoint's
    own retries are off, since trying another endpoint is the retry."""
    from inference.triton_backend import TritonBackend
    from inference.triton_fleet import TritonFleet

    endpoints = [
        TritonBackend(
            spec,
            url,
            protocol=triton.protocol,
            request_timeout_s=triton.request_timeout_s,
            retries=0,
            max_in_flight=triton.max_in_flight,
            shared_memory=triton.shared_memory,
        )
        for url in dict.fromkeys(triton.urls)
    ]
    log.info("Triton fleet of %d endpoint(s): %s", len(endpoints), ", ".join(e.url for e in endpoints))
    return TritonFleet(endpoints)


def _triton_backend(triton: TritonSection, spec: InferenceSpec, stack: ExitStack, repository: Path) -> Backend:
    from inference.triton_backend import TritonBackend, normalize_url, server_error

    if triton.urls:
        return _triton_fleet(triton, spec)
    url = normalize_url(triton.url)
    error = server_error(url, triton.protocol, min(PROBE_TIMEOUT_S, triton.request_timeout_s))
    if error is not None:
        host, _ = split_url(url)
        if not triton.managed:
            raise BackendUnavailable(
                f"Triton at {url} ({triton.protocol}) is unreachable: {error} "
                "(inference.triton.managed is false, so the node does not start one)"
            )
        if not is_local_host(host):
            raise BackendUnavailable(
                f"Triton at {url} ({triton.protocol}) is unreachable: {error} "
                "(not a loopback address, so the node does not start one there)"
            )
        onnx_path = spec.model.onnx_path(repository)
        if not onnx_path.is_file():  # what the repository's model.py would fail on, said in one line
            raise ModelMismatch(
                f"{onnx_path}: model file not found (model {spec.model.name!r} version {spec.model.version} of "
                f"the model repository {repository}, which the node would serve on a Triton of its own)"
            )
        options, url = managed_server_options(triton, spec.model.name)
        log.info("nothing answers at %s: starting a managed tritonserver on %s", triton.url, repository)
        server = stack.enter_context(ManagedTriton(repository, options))
        log.info("managed tritonserver ready in %.1f s at %s", server.startup_s or 0.0, url)
    return TritonBackend(
        spec,
        url,
        protocol=triton.protocol,
        request_timeout_s=triton.request_timeout_s,
        retries=triton.retries,
        max_in_flight=triton.max_in_flight,
        shared_memory=triton.shared_memory,
    )
