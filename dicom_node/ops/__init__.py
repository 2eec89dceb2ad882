"""Running the node as hospital infrastructure: health and readiness, Prometheus metrics, the status page."""

from dicom_node.ops.metrics import NodeMetrics, StateCollector, TimedBackend

__all__ = ["NodeMetrics", "StateCollector", "TimedBackend"]
