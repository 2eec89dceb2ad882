"""The node's Prometheus metrics: one :class:`NodeMetrics` per node, on a registry of its own.

No module-global registry: several nodes run in one process in the tests, and each must count only its own.
The parts that count (SCP, worker pool, processor, outbox) get the object in their constructor. What the
database already knows (jobs by state, series completed, queue depth, outbox rows) and what the machine knows
(free storage) is read when Prometheus scrapes (:class:`StateCollector`), so those figures survive a restart
and can never drift from ``dicom-node status``.

Names follow Prometheus conventions (``_total`` for counters, ``_seconds`` and ``_bytes`` units); the README's
"Monitoring" section lists them, and ``deploy/grafana-dashboard.json`` plots them.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dicom_node.db import Database
from dicom_node.jobs import JobOutcome, JobState
from inference.backend import Backend
from inference.triton_fleet import EndpointState

LISTENERS = ("plain", "tls")
"""The DIMSE listeners (label ``listener`` of ``dicom_node_associations_accepted_total``)."""

REJECTION_REASONS = (
    "calling_ae_title",
    "called_ae_title",
    "caller_host",
    "too_many_associations",
    "tls_handshake",
    "other",
)
"""Why associations are rejected (label ``reason`` of ``dicom_node_associations_rejected_total``)."""

REFUSAL_REASONS = ("out_of_resources", "invalid_dataset", "cannot_understand", "processing_failure", "other")
"""Why instances are refused (label ``reason`` of ``dicom_node_instances_refused_total``), by DIMSE status."""

STAGES = ("decode", "reconstruct", "inference", "seg", "export")
"""Stages timed per job (label ``stage`` of ``dicom_node_stage_duration_seconds``); ``export`` is one send."""

JOB_OUTCOMES = ("done", "exporting", "skipped", "failed", "retry", "waiting_for_backend")

_REFUSAL_BY_STATUS = {
    0xA700: "out_of_resources",
    0xA900: "invalid_dataset",
    0xC000: "cannot_understand",
    0x0110: "processing_failure",
}


def refusal_reason(status: int) -> str:
    """The ``reason`` label of a refused C-STORE's status."""
    return _REFUSAL_BY_STATUS.get(status, "other")


class NodeMetrics:
    """Every metric the node's parts update, on the node's own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.associations_accepted = Counter(
            "dicom_node_associations_accepted", "DIMSE associations accepted", ["listener"], registry=r
        )
        self.associations_rejected = Counter(
            "dicom_node_associations_rejected",
            "DIMSE associations (or TLS connections) refused, by reason",
            ["reason"],
            registry=r,
        )
        self.instances_received = Counter(
            "dicom_node_instances_received", "CT instances stored durably and answered Success", registry=r
        )
        self.instances_refused = Counter(
            "dicom_node_instances_refused", "C-STORE requests refused, by reason", ["reason"], registry=r
        )
        self.received_bytes = Counter(
            "dicom_node_received_bytes", "Dataset bytes received in C-STORE requests", registry=r
        )
        self.store_duration = Histogram(
            "dicom_node_store_duration_seconds",
            "Time to handle one C-STORE request (parse, durable write, record), until its status is returned",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
            registry=r,
        )
        self.stage_seconds = Histogram(
            "dicom_node_stage_duration_seconds",
            "Time spent in one stage of a job (export: one send to one destination)",
            ["stage"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0, 600.0),
            registry=r,
        )
        self.job_outcomes = Counter(
            "dicom_node_job_outcomes", "Outcomes of job runs recorded by the workers", ["outcome"], registry=r
        )
        self.export_attempts = Counter(
            "dicom_node_export_attempts",
            "C-STORE sends of an object (SEG, SR, overlay), by destination",
            ["destination"],
            registry=r,
        )
        self.export_failures = Counter(
            "dicom_node_export_failures",
            "Sends that did not deliver (to be retried, or failed for good), by destination",
            ["destination"],
            registry=r,
        )
        self.inference_request_seconds = Histogram(
            "dicom_node_inference_request_duration_seconds",
            "Latency of one inference request (a batch of windows) to the model backend: Triton's round trip, "
            "or ONNX Runtime's run",
            ["backend"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0),
            registry=r,
        )
        for listener in LISTENERS:
            self.associations_accepted.labels(listener)
        for reason in REJECTION_REASONS:
            self.associations_rejected.labels(reason)
        for reason in REFUSAL_REASONS:
            self.instances_refused.labels(reason)
        for stage in STAGES:
            self.stage_seconds.labels(stage)
        for outcome in JOB_OUTCOMES:
            self.job_outcomes.labels(outcome)

    # -- what the parts call ------------------------------------------------------------------------------
    # Reception (``dicom_node.receive.scp.ReceptionCounters``).
    def association_accepted(self, listener: str) -> None:
        self.associations_accepted.labels(listener).inc()

    def association_rejected(self, reason: str) -> None:
        self.associations_rejected.labels(reason).inc()

    def bytes_received(self, count: int) -> None:
        self.received_bytes.inc(count)

    def instance_received(self) -> None:
        self.instances_received.inc()

    def instance_refused(self, status: int) -> None:
        self.instances_refused.labels(refusal_reason(status)).inc()

    def store_seconds(self, seconds: float) -> None:
        self.store_duration.observe(seconds)

    def observe_stage(self, stage: str, seconds: float) -> None:
        self.stage_seconds.labels(stage).observe(seconds)

    def job_outcome(self, outcome: JobOutcome, *, requeued: bool) -> None:
        """One recorded outcome of a worker (``requeued``: a retryable failure went back to the queue)."""
        if outcome.deferred:
            name = "waiting_for_backend"
        elif requeued:
            name = "retry"
        else:
            name = outcome.state.value
        self.job_outcomes.labels(name).inc()

    def export_attempt(self, destination: str, delivered: bool, seconds: float) -> None:
        self.export_attempts.labels(destination).inc()
        if not delivered:
            self.export_failures.labels(destination).inc()
        self.observe_stage("export", seconds)

    def known_destinations(self, destinations: Iterable[str]) -> None:
        """Show every configured destination at 0 before its first send."""
        for name in destinations:
            self.export_attempts.labels(name)
            self.export_failures.labels(name)

    def timed(self, backend: Backend) -> TimedBackend:
        """``backend`` with each request's latency observed."""
        return TimedBackend(backend, self.inference_request_seconds.labels(backend.name).observe)

    def watch(self, collector: StateCollector) -> None:
        """Add the figures read at scrape time."""
        self.registry.register(collector)

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)


class TimedBackend:
    """A :class:`~inference.backend.Backend` that times each ``infer`` call (one request to the model server)."""

    def __init__(self, inner: Backend, observe: Callable[[float], None]) -> None:
        self.inner = inner
        self.name = inner.name
        self.max_in_flight = int(getattr(inner, "max_in_flight", 1) or 1)
        """The pipeline keeps this many requests in flight (Triton's ``max_in_flight``; 1 for ONNX Runtime)."""
        self._observe = observe

    def check(self) -> None:
        self.inner.check()

    def infer(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        t0 = time.perf_counter()
        try:
            return self.inner.infer(batch)
        finally:
            self._observe(time.perf_counter() - t0)

    def close(self) -> None:
        self.inner.close()


class StateCollector(Collector):
    """Figures read when Prometheus scrapes: from the state database, the storage folder and the backend."""

    def __init__(
        self,
        db: Database,
        storage_dir: Path,
        backend_problem: Callable[[], str | None],
        backend_endpoints: Callable[[], Sequence[EndpointState]] = tuple,
    ) -> None:
        self.db = db
        self.storage_dir = storage_dir
        self.backend_problem = backend_problem
        self.backend_endpoints = backend_endpoints

    def describe(self) -> Iterator[Metric]:
        yield from _StateFamilies().all()

    def collect(self) -> Iterator[Metric]:
        f = _StateFamilies()
        jobs = self.db.job_state_counts()
        for state, n in jobs.items():
            f.jobs.add_metric([state.value], n)
        f.series_completed.add_metric([], self.db.series_runs_completed())
        exports = self.db.export_state_counts()
        for row_state in EXPORT_STATES:
            f.exports.add_metric([row_state], exports.get(row_state, 0))
        f.queue_depth.add_metric(["jobs"], jobs[JobState.QUEUED])
        f.queue_depth.add_metric(["exports"], exports.get("pending", 0) + exports.get("sending", 0))
        f.storage_free.add_metric([], shutil.disk_usage(self.storage_dir).free)
        f.backend_ready.add_metric([], 1.0 if self.backend_problem() is None else 0.0)
        for endpoint in self.backend_endpoints():  # a Triton fleet (inference.triton.urls): one series each
            f.endpoint_up.add_metric([endpoint.url], 1.0 if endpoint.healthy else 0.0)
            f.endpoint_in_flight.add_metric([endpoint.url], endpoint.in_flight)
            f.endpoint_requests.add_metric([endpoint.url], endpoint.requests)
            f.endpoint_failures.add_metric([endpoint.url], endpoint.failures)
        yield from f.all()


EXPORT_STATES = ("pending", "sending", "delivered", "warning", "failed")


class _StateFamilies:
    """The metric families :class:`StateCollector` fills on each scrape."""

    def __init__(self) -> None:
        self.jobs = GaugeMetricFamily("dicom_node_jobs", "Jobs (runs of a series) in each state", labels=["state"])
        self.series_completed = CounterMetricFamily(
            "dicom_node_series_completed", "Series runs declared complete (read from the state database)"
        )
        self.exports = GaugeMetricFamily(
            "dicom_node_exports", "Outbox rows (one object x one destination) in each state", labels=["state"]
        )
        self.queue_depth = GaugeMetricFamily(
            "dicom_node_queue_depth",
            "Work waiting: jobs queued for a worker, SEG sends pending or in flight in the outbox",
            labels=["queue"],
        )
        self.storage_free = GaugeMetricFamily(
            "dicom_node_storage_free_bytes", "Free bytes on the file system of storage.dir"
        )
        self.backend_ready = GaugeMetricFamily(
            "dicom_node_backend_ready", "1 when the model backend is ready to take a job, else 0"
        )
        url = ["endpoint"]
        self.endpoint_up = GaugeMetricFamily(
            "dicom_node_triton_endpoint_up", "1 while a Triton endpoint of the fleet is healthy, else 0", labels=url
        )
        self.endpoint_in_flight = GaugeMetricFamily(
            "dicom_node_triton_endpoint_in_flight", "Requests in flight to a Triton endpoint of the fleet", labels=url
        )
        self.endpoint_requests = CounterMetricFamily(
            "dicom_node_triton_endpoint_requests", "Requests sent to a Triton endpoint of the fleet", labels=url
        )
        self.endpoint_failures = CounterMetricFamily(
            "dicom_node_triton_endpoint_failures",
            "Times a Triton endpoint of the fleet was taken out (refused, timed out, not ready)",
            labels=url,
        )

    def all(self) -> tuple[Metric, ...]:
        return (self.jobs, self.series_completed, self.exports, self.queue_depth, self.storage_free,
                self.backend_ready, self.endpoint_up, self.endpoint_in_flight, self.endpoint_requests,
                self.endpoint_failures)  # fmt: skip
