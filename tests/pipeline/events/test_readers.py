"""The readers: EventSubscriber (consumer groups, replay of unacked entries, reconnects) and tail,
against a real redis-server."""

from __future__ import annotations

import io
import json
import threading
import time
from itertools import islice
from typing import Any

import pytest

from pipeline.config import BackoffConfig
from pipeline.events import EventPublisher, EventSubscriber, tail, validate_event_dict
from pipeline.metrics import PipelineMetrics
from tests.pipeline.events.helpers import PREFIX, frame_events, real_config


@pytest.mark.integration
def test_subscriber_resumes_with_its_unacked_entries(redis_server: Any) -> None:
    publisher = EventPublisher(real_config(redis_server.url), PipelineMetrics())
    for frame in range(5):
        publisher.publish("cam1", frame_events("cam1", frame))

    first = EventSubscriber(redis_server.url, PREFIX, "cam1", "analytics", "worker-1", start_id="0", block_ms=100)
    messages = first.read()
    assert [message.event.frame_index for message in messages] == [0, 1, 2, 3, 4]
    assert all(message.stream == "test:events:cam1" for message in messages)
    assert first.ack(messages[0].stream, *(message.message_id for message in messages[:2])) == 2
    first.close()  # "crash" with frames 2-4 delivered but not acked

    publisher.publish("cam1", frame_events("cam1", 5))
    second = EventSubscriber(redis_server.url, PREFIX, ["cam1"], "analytics", "worker-1", start_id="0", block_ms=100)
    replayed = second.read()
    assert [message.event.frame_index for message in replayed] == [2, 3, 4]
    assert [message.message_id for message in replayed] == [message.message_id for message in messages[2:]]
    second.ack("test:events:cam1", *(message.message_id for message in replayed))
    fresh = second.read()
    assert [message.event.frame_index for message in fresh] == [5]
    second.ack(fresh[0].stream, fresh[0].message_id)
    assert second.read(block_ms=50) == []
    second.close()

    third = EventSubscriber(redis_server.url, PREFIX, "cam1", "analytics", "worker-1", block_ms=50)
    assert third.read() == []  # everything acked: nothing is replayed
    third.close()
    publisher.close()


@pytest.mark.integration
def test_subscriber_on_several_cameras_from_new_events_only(redis_server: Any) -> None:
    publisher = EventPublisher(real_config(redis_server.url), PipelineMetrics())
    publisher.publish("cam1", frame_events("cam1", 0))  # history, before the group exists

    subscriber = EventSubscriber(redis_server.url, PREFIX, ["cam1", "cam2"], "dash", "d1", start_id="$", block_ms=100)
    subscriber.ensure_groups()
    subscriber.ensure_groups()  # BUSYGROUP is ignored
    publisher.publish("cam1", frame_events("cam1", 1))
    publisher.publish("cam2", frame_events("cam2", 1))
    got: list[tuple[str, int]] = []
    deadline = time.monotonic() + 5.0
    while len(got) < 2 and time.monotonic() < deadline:
        got += [(message.event.camera_id, message.event.frame_index) for message in subscriber.read()]
    assert sorted(got) == [("cam1", 1), ("cam2", 1)]
    subscriber.close()
    publisher.close()


@pytest.mark.integration
def test_subscriber_listen_survives_a_redis_restart(redis_server: Any) -> None:
    publisher = EventPublisher(real_config(redis_server.url), PipelineMetrics())
    subscriber = EventSubscriber(redis_server.url, PREFIX, "cam1", "g", "c", block_ms=100)
    subscriber.ensure_groups()
    redis_server.stop()
    redis_server.start()  # the group is gone (no persistence): listen() must recreate it
    for frame in range(2):
        publisher.publish("cam1", frame_events("cam1", frame))
    stop = threading.Event()
    timer = threading.Timer(10.0, stop.set)  # a safety net: never hang the suite
    timer.start()
    try:
        got = list(islice(subscriber.listen(stop, retry=BackoffConfig(initial_s=0.05, max_s=0.1, jitter=0)), 2))
    finally:
        timer.cancel()
    assert [message.event.frame_index for message in got] == [0, 1]
    subscriber.close()
    publisher.close()


@pytest.mark.integration
def test_tail_prints_history_as_json_lines(redis_server: Any) -> None:
    publisher = EventPublisher(real_config(redis_server.url), PipelineMetrics())
    for frame in range(3):
        publisher.publish("cam1", frame_events("cam1", frame))
    out = io.StringIO()
    assert tail(redis_server.url, PREFIX, "cam1", from_start=True, count=3, out=out) == 3
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    for frame, line in enumerate(lines):
        data = json.loads(line)
        validate_event_dict(data)
        assert data["frame_index"] == frame
    publisher.close()


@pytest.mark.integration
def test_tail_follows_new_events_only(redis_server: Any) -> None:
    publisher = EventPublisher(real_config(redis_server.url), PipelineMetrics())
    for frame in range(3):  # history that must not be printed
        publisher.publish("cam1", frame_events("cam1", frame))
    out = io.StringIO()
    thread = threading.Thread(target=tail, args=(redis_server.url, PREFIX, "cam1"), kwargs={"count": 2, "out": out, "block_ms": 100})
    thread.start()
    frame, deadline = 100, time.monotonic() + 10.0
    while thread.is_alive() and time.monotonic() < deadline:
        publisher.publish("cam1", frame_events("cam1", frame))
        frame += 1
        thread.join(0.05)
    assert not thread.is_alive()
    frames = [json.loads(line)["frame_index"] for line in out.getvalue().splitlines()]
    assert len(frames) == 2 and all(index >= 100 for index in frames) and frames == sorted(frames)
    publisher.close()
