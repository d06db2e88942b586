"""Prometheus metrics for everything that moves through the pipeline.

All metrics live on one ``PipelineMetrics`` object. It builds its families through a
``MetricFactory``: by default prometheus-client on a private registry (the single-process
``ferstream run`` serves it over HTTP; tests read it directly), while the Serve app passes a
factory that records through Ray's metrics agent so every replica is scraped from Ray's
metrics port. Names follow the Prometheus conventions: ``_total`` counters, ``_seconds``
histograms, base units.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

NAMESPACE = "ferstream"
# Stage latencies on a CPU run from ~1 ms (tracking) to seconds (detection of a 1080p batch).
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Capture-to-publish latency includes queueing behind slower stages, so it reaches further.
END_TO_END_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

STAGES = ("decode", "detect", "classify", "track", "publish")


class MetricFactory(Protocol):
    """Builds metric families with prometheus-client's interface: ``.labels(**values)`` returns a
    child with ``inc``/``set``/``observe``; label-less families have those methods themselves."""

    def counter(self, name: str, documentation: str, labels: Sequence[str]) -> Any: ...

    def gauge(self, name: str, documentation: str, labels: Sequence[str]) -> Any: ...

    def histogram(self, name: str, documentation: str, labels: Sequence[str], buckets: Sequence[float]) -> Any: ...

    def remove_series(self, family: Any, label_names: Sequence[str], matching: Mapping[str, str]) -> None:
        """Forget every series of ``family`` (built by this factory with ``label_names``) whose labels include ``matching``."""
        ...


class PrometheusMetricFactory:
    def __init__(self, registry: CollectorRegistry | None = None, namespace: str = NAMESPACE) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.namespace = namespace

    def counter(self, name: str, documentation: str, labels: Sequence[str]) -> Counter:
        return Counter(name, documentation, list(labels), namespace=self.namespace, registry=self.registry)

    def gauge(self, name: str, documentation: str, labels: Sequence[str]) -> Gauge:
        return Gauge(name, documentation, list(labels), namespace=self.namespace, registry=self.registry)

    def histogram(self, name: str, documentation: str, labels: Sequence[str], buckets: Sequence[float]) -> Histogram:
        return Histogram(name, documentation, list(labels), buckets=tuple(buckets), namespace=self.namespace, registry=self.registry)

    def remove_series(self, family: Counter | Gauge | Histogram, label_names: Sequence[str], matching: Mapping[str, str]) -> None:
        # Through collect() and remove(), which every supported prometheus-client has (remove_by_labels is newer).
        doomed = set()
        for metric in family.collect():
            for sample in metric.samples:
                if all(sample.labels.get(name) == value for name, value in matching.items()):
                    doomed.add(tuple(sample.labels[name] for name in label_names))
        for values in doomed:
            family.remove(*values)


class PipelineMetrics:
    """The ferstream metric families. ``camera`` labels are the camera ids."""

    def __init__(self, factory: MetricFactory | None = None) -> None:
        self.factory: MetricFactory = factory if factory is not None else PrometheusMetricFactory()
        # Families with a camera label: their series go with the camera (forget_camera).
        self.per_camera: list[tuple[Any, tuple[str, ...]]] = []

        def counter(name: str, documentation: str, labels: Sequence[str]) -> Any:
            return self._family(self.factory.counter(name, documentation, labels), labels)

        def gauge(name: str, documentation: str, labels: Sequence[str]) -> Any:
            return self._family(self.factory.gauge(name, documentation, labels), labels)

        def histogram(name: str, documentation: str, labels: Sequence[str], buckets: Sequence[float]) -> Any:
            return self._family(self.factory.histogram(name, documentation, labels, buckets), labels)

        # Sources
        self.frames_decoded = counter("frames_decoded", "Frames decoded from the source", ["camera"])
        self.frames_processed = counter("frames_processed", "Frames taken for processing", ["camera"])
        self.frames_dropped = counter(
            "frames_dropped",
            "Frames decoded but not processed, by reason"
            " (fps_limit: above target fps; stale: a fresher frame replaced it; too_large: above max_frame_pixels)",
            ["camera", "reason"],
        )
        self.decode_errors = counter("decode_errors", "Source open/decode errors, by kind (open, decode, stall)", ["camera", "kind"])
        self.reconnects = counter("reconnects", "Reconnect attempts after a failure or a watchdog timeout", ["camera"])
        self.stream_up = gauge("stream_up", "1 while the source is open and delivering frames", ["camera"])

        # Models
        self.faces_detected = counter("faces_detected", "Faces found by the detector", ["camera"])
        self.frames_failed = counter(
            "frames_failed",
            "Frames lost because a stage raised on them, by stage (detect, classify, track, publish); the other cameras go on",
            ["camera", "stage"],
        )
        self.classifications = counter("classifications", "Faces classified, by top emotion", ["camera", "emotion"])
        self.batch_size = histogram("batch_size", "Items per model batch", ["stage"], BATCH_BUCKETS)
        self.stage_latency = histogram("stage_latency_seconds", "Time spent in one pipeline stage per call", ["stage"], STAGE_BUCKETS)
        self.end_to_end_latency = histogram(
            "end_to_end_latency_seconds", "Wall-clock time from frame capture to event publish", ["camera"], END_TO_END_BUCKETS
        )

        # Events
        self.events_published = counter("events_published", "Events written to the event sink (Redis Streams by default)", ["camera"])
        self.events_buffered = gauge("events_buffered", "Events held in memory waiting for Redis", [])
        self.events_dropped = counter(
            "events_dropped",
            "Events lost, by reason (buffer_full: Redis unreachable too long; closed: undelivered at shutdown)",
            ["camera", "reason"],
        )
        self.redis_errors = counter("redis_errors", "Failed event-sink writes, Redis by default (each is retried)", [])

    @property
    def registry(self) -> CollectorRegistry:
        """The prometheus-client registry (only with the default factory)."""
        if not isinstance(self.factory, PrometheusMetricFactory):
            raise TypeError(f"these metrics record through {type(self.factory).__name__}, not a prometheus-client registry")
        return self.factory.registry

    def _family(self, family: Any, labels: Sequence[str]) -> Any:
        if "camera" in labels:
            self.per_camera.append((family, tuple(labels)))
        return family

    def forget_camera(self, camera_id: str) -> None:
        """A removed camera's series go: every family with a camera label drops that camera's.

        ``stream_up`` is set to 0 first, for exporters that cannot drop a series (Ray's agent
        keeps exporting a gauge's last value). A camera added again starts its counters at 0,
        which Prometheus' ``rate()`` reads as a counter reset.
        """
        self.stream_up.labels(camera=camera_id).set(0)
        for family, label_names in self.per_camera:
            self.factory.remove_series(family, label_names, {"camera": camera_id})


class SubscriberMetrics:
    """What an ``EventSubscriber`` (pipeline/events/readers.py) counts, on a consumer's own registry.

    ``camera`` is the stream's camera and ``group`` the consumer group.
    """

    def __init__(self, factory: MetricFactory | None = None) -> None:
        self.factory: MetricFactory = factory if factory is not None else PrometheusMetricFactory()
        self.events_lost_to_trim = self.factory.counter(
            "events_lost_to_trim",
            "Stream entries trimmed (XADD MAXLEN) before the group handled them, by state"
            " (unread: never delivered to the group; pending: delivered but never acked)",
            ["camera", "group", "state"],
        )
        self.events_claimed = self.factory.counter(
            "events_claimed", "Entries claimed (XAUTOCLAIM) from consumers that left them pending too long", ["camera", "group"]
        )

    @property
    def registry(self) -> CollectorRegistry:
        if not isinstance(self.factory, PrometheusMetricFactory):
            raise TypeError(f"these metrics record through {type(self.factory).__name__}, not a prometheus-client registry")
        return self.factory.registry


def serve_metrics(metrics: PipelineMetrics, host: str, port: int) -> int:
    """Expose the registry over HTTP; returns the bound port (useful when port is 0)."""
    server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    return int(server.server_address[1])
