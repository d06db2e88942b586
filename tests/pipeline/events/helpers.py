"""Helpers shared by the event tests: event factories, metric reads, and an in-memory sink."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from pipeline.config import BackoffConfig, EventsConfig
from pipeline.events import EventSink, EventSinkUnavailable, ExpressionEvent
from pipeline.metrics import PipelineMetrics

PREFIX = "test"
CAPTURE_TIME = 1_700_000_000.25
RUN_ID = "0f3c2a9e8b7d4c1fa6e5d4c3b2a19080"


def make_event(**overrides: Any) -> ExpressionEvent:
    values: dict[str, Any] = {
        "camera_id": "cam1",
        "run_id": RUN_ID,
        "frame_index": 7,
        "pts_s": 0.7,
        "capture_time": CAPTURE_TIME,
        "track_id": 3,
        "box": (10, 20, 110, 140),
        "detector_score": 0.98,
        "emotion": "happy",
        "confidence": 0.8,
        "probabilities": {"happy": 0.8, "neutral": 0.15, "sad": 0.05},
        "model_id": "resnet18-fer@abc123",
    }
    values.update(overrides)
    return ExpressionEvent(**values)


def frame_events(camera_id: str, frame_index: int, faces: int = 1, emotion: str = "happy") -> list[ExpressionEvent]:
    return [make_event(camera_id=camera_id, frame_index=frame_index, track_id=track, emotion=emotion) for track in range(faces)]


def sample(metrics: PipelineMetrics, name: str, labels: dict[str, str] | None = None) -> float:
    return metrics.registry.get_sample_value(name, labels or {}) or 0.0


def dropped(metrics: PipelineMetrics, camera: str, reason: str = "buffer_full") -> float:
    return sample(metrics, "ferstream_events_dropped_total", {"camera": camera, "reason": reason})


def real_config(url: str, **overrides: Any) -> EventsConfig:
    values: dict[str, Any] = {
        "redis_url": url,
        "stream_prefix": PREFIX,
        "retry": BackoffConfig(initial_s=0.05, max_s=0.2, jitter=0),
        "socket_timeout_s": 1.0,
    }
    return EventsConfig(**(values | overrides))


class MemorySink(EventSink):
    """Keeps what it is given; ``error`` set: every write fails with it (retryable)."""

    name = "memory"

    def __init__(self) -> None:
        self.error: Exception | None = None
        self.lock = threading.Lock()
        self.calls = 0
        self.written: list[ExpressionEvent] = []
        self.closed = False

    def write(self, events: Sequence[ExpressionEvent]) -> None:
        with self.lock:  # like a server: one batch at a time
            self.calls += 1
            if self.error is not None:
                raise self.error
            self.written.extend(events)

    def close(self) -> None:
        self.closed = True

    def fail(self, message: str = "down") -> None:
        self.error = EventSinkUnavailable(message)

    def recover(self) -> None:
        self.error = None
