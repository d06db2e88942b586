"""Helpers shared by the camera tests: configs with quick failure handling, reading until finished, metrics."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from pipeline.config import BackoffConfig, SourceConfig
from pipeline.frames import VideoFrame
from pipeline.metrics import PipelineMetrics
from pipeline.sources.camera import CameraSource

FAST_BACKOFF = BackoffConfig(initial_s=0.01, max_s=0.05, multiplier=2.0, jitter=0.2)


def make_config(url: Path | str, **overrides: Any) -> SourceConfig:
    """Offline-style defaults: every frame, no pacing, quick failure handling."""
    values: dict[str, Any] = {
        "camera_id": "cam",
        "url": str(url),
        "target_fps": None,
        "realtime": False,
        "open_timeout_s": 2.0,
        "watchdog_timeout_s": 1.0,
        "reconnect": FAST_BACKOFF,
    }
    values.update(overrides)
    return SourceConfig(**values)


def sample(metrics: PipelineMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(f"ferstream_{name}", {"camera": "cam", **labels})
    return value or 0.0


def drain(source: CameraSource, timeout_s: float = 15.0) -> list[VideoFrame]:
    """Read until the source is finished."""
    frames: list[VideoFrame] = []
    deadline = time.monotonic() + timeout_s
    while not source.finished:
        assert time.monotonic() < deadline, f"source did not finish: {source.status()}"
        frame = source.read(timeout=0.5)
        if frame is not None:
            frames.append(frame)
    return frames


def wait_until(predicate: Any, timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def assert_accounted(source: CameraSource, metrics: PipelineMetrics) -> None:
    """Every decoded frame was either handed out or dropped for a reason."""
    decoded = sample(metrics, "frames_decoded_total")
    processed = sample(metrics, "frames_processed_total")
    dropped = sample(metrics, "frames_dropped_total", reason="stale") + sample(metrics, "frames_dropped_total", reason="fps_limit")
    assert decoded == processed + dropped
    assert source.status().frames_decoded == decoded
    assert source.status().frames_dropped == dropped


def source_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("ferstream-source-")]
