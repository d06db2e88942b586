"""Prometheus metrics for everything that moves through the pipeline.

All metrics live on one ``PipelineMetrics`` object bound to a registry, so tests can use
a fresh registry and a process can hold exactly one set of series. Names follow the
Prometheus conventions: ``_total`` counters, ``_seconds`` histograms, base units.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Stage latencies on a CPU run from ~1 ms (tracking) to seconds (detection of a 1080p batch).
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Capture-to-publish latency includes queueing behind slower stages, so it reaches further.
END_TO_END_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

STAGES = ("decode", "detect", "classify", "track", "publish")


class PipelineMetrics:
    """The ferstream metric families. ``camera`` labels are the camera ids."""

    def __init__(self, registry: CollectorRegistry | None = None, namespace: str = "ferstream") -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        ns, reg = namespace, self.registry

        # Sources
        self.frames_decoded = Counter("frames_decoded", "Frames decoded from the source", ["camera"], namespace=ns, registry=reg)
        self.frames_processed = Counter("frames_processed", "Frames taken for processing", ["camera"], namespace=ns, registry=reg)
        self.frames_dropped = Counter(
            "frames_dropped",
            "Frames decoded but not processed, by reason (fps_limit: above target fps; stale: a fresher frame replaced it)",
            ["camera", "reason"],
            namespace=ns,
            registry=reg,
        )
        self.decode_errors = Counter("decode_errors", "Source open/decode errors, by kind", ["camera", "kind"], namespace=ns, registry=reg)
        self.reconnects = Counter(
            "reconnects", "Reconnect attempts after a failure or a watchdog timeout", ["camera"], namespace=ns, registry=reg
        )
        self.stream_up = Gauge("stream_up", "1 while the source is open and delivering frames", ["camera"], namespace=ns, registry=reg)

        # Models
        self.faces_detected = Counter("faces_detected", "Faces found by the detector", ["camera"], namespace=ns, registry=reg)
        self.classifications = Counter(
            "classifications", "Faces classified, by top emotion", ["camera", "emotion"], namespace=ns, registry=reg
        )
        self.batch_size = Histogram("batch_size", "Items per model batch", ["stage"], buckets=BATCH_BUCKETS, namespace=ns, registry=reg)
        self.stage_latency = Histogram(
            "stage_latency_seconds",
            "Time spent in one pipeline stage per call",
            ["stage"],
            buckets=STAGE_BUCKETS,
            namespace=ns,
            registry=reg,
        )
        self.end_to_end_latency = Histogram(
            "end_to_end_latency_seconds",
            "Wall-clock time from frame capture to event publish",
            ["camera"],
            buckets=END_TO_END_BUCKETS,
            namespace=ns,
            registry=reg,
        )

        # Events
        self.events_published = Counter("events_published", "Events written to Redis", ["camera"], namespace=ns, registry=reg)
        self.events_buffered = Gauge("events_buffered", "Events held in memory waiting for Redis", namespace=ns, registry=reg)
        self.events_dropped = Counter(
            "events_dropped",
            "Events lost, by reason (buffer_full: Redis unreachable too long; closed: undelivered at shutdown)",
            ["camera", "reason"],
            namespace=ns,
            registry=reg,
        )
        self.redis_errors = Counter("redis_errors", "Failed Redis writes (each is retried)", namespace=ns, registry=reg)

    def forget_camera(self, camera_id: str) -> None:
        """Mark a removed camera's stream as down; counters keep their history."""
        self.stream_up.labels(camera=camera_id).set(0)


def serve_metrics(metrics: PipelineMetrics, host: str, port: int) -> int:
    """Expose the registry over HTTP; returns the bound port (useful when port is 0)."""
    server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    return int(server.server_address[1])
