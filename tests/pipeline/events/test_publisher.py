"""The transport-neutral publisher against an in-memory sink: ordering, the buffer bound and its drop count, retry."""

from __future__ import annotations

import time
from typing import Any

import pytest

from pipeline.config import BackoffConfig, EventsConfig
from pipeline.events import EventPublisher
from pipeline.metrics import PipelineMetrics
from tests.pipeline.events.helpers import CAPTURE_TIME, MemorySink, dropped, frame_events, sample


def config(**overrides: Any) -> EventsConfig:
    # A retry delay far longer than any test: the flusher only tries when flush() kicks it.
    values: dict[str, Any] = {"retry": BackoffConfig(initial_s=60, max_s=60, jitter=0)}
    return EventsConfig(**(values | overrides))


def written(sink: MemorySink) -> list[tuple[str, int]]:
    return [(event.camera_id, event.frame_index) for event in sink.written]


def test_events_reach_the_sink_stamped_and_counted() -> None:
    sink, metrics = MemorySink(), PipelineMetrics()
    publisher = EventPublisher(config(), metrics, sink, wall_clock=lambda: CAPTURE_TIME + 0.5)
    published = publisher.publish("cam1", frame_events("cam1", 0, faces=3))
    assert sink.calls == 1 and sink.written == published
    assert [event.publish_time for event in sink.written] == [CAPTURE_TIME + 0.5] * 3
    assert sample(metrics, "ferstream_events_published_total", {"camera": "cam1"}) == 3
    assert publisher.publish("cam1", []) == [] and sink.calls == 1
    publisher.close()
    assert not sink.closed  # a sink it was given stays the caller's


def test_a_failing_sink_buffers_up_to_the_bound_and_counts_the_dropped() -> None:
    sink, metrics = MemorySink(), PipelineMetrics()
    sink.fail()
    publisher = EventPublisher(config(buffer_max_events=3), metrics, sink)
    for frame in range(5):
        assert len(publisher.publish("cam1", frame_events("cam1", frame))) == 1  # never raises
    assert publisher.buffered == 3 and dropped(metrics, "cam1") == 2
    assert sample(metrics, "ferstream_events_buffered") == 3
    assert sink.calls == 1  # while degraded, frames go straight to the buffer
    assert sample(metrics, "ferstream_redis_errors_total") == 1

    assert not publisher.flush(0.5)  # the kicked retry fails too: nothing more is lost
    assert sink.calls == 2 and publisher.buffered == 3 and dropped(metrics, "cam1") == 2

    sink.recover()
    assert publisher.flush(5.0)
    assert written(sink) == [("cam1", 2), ("cam1", 3), ("cam1", 4)]  # the newest survive, in order
    publisher.publish("cam1", frame_events("cam1", 5))  # direct again, behind the backlog
    assert written(sink)[-1] == ("cam1", 5)
    publisher.close()


def test_retry_delivers_the_backlog_without_a_flush() -> None:
    sink, metrics = MemorySink(), PipelineMetrics()
    sink.fail()
    publisher = EventPublisher(config(retry=BackoffConfig(initial_s=0.01, max_s=0.02, jitter=0)), metrics, sink)
    for frame in range(3):
        publisher.publish("cam1", frame_events("cam1", frame))
        publisher.publish("cam2", frame_events("cam2", frame))
    sink.recover()
    for _ in range(500):
        if publisher.buffered == 0:
            break
        time.sleep(0.01)
    assert publisher.buffered == 0
    for camera in ("cam1", "cam2"):
        assert [index for camera_id, index in written(sink) if camera_id == camera] == [0, 1, 2]
    assert sink.calls >= 2
    publisher.close()


def test_an_unexpected_sink_error_is_not_swallowed() -> None:
    sink = MemorySink()
    sink.error = RuntimeError("a bug in the sink")
    publisher = EventPublisher(config(), PipelineMetrics(), sink)
    with pytest.raises(RuntimeError, match="a bug"):
        publisher.publish("cam1", frame_events("cam1", 0))
    publisher.close()
