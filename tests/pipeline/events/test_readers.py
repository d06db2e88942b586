"""The readers: EventSubscriber (consumer groups, replay of unacked entries, reconnects) and tail,
against a real redis-server."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from itertools import islice
from pathlib import Path
from typing import Any

import pytest
import redis

from pipeline.config import BackoffConfig
from pipeline.events import EventPublisher, EventSubscriber, StreamMessage, tail, validate_event_dict
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


# -- dead consumers and trimming ------------------------------------------------------------------


def lost(subscriber: EventSubscriber, state: str, camera: str = "cam1") -> float:
    labels = {"camera": camera, "group": subscriber.group, "state": state}
    return subscriber.metrics.registry.get_sample_value("ferstream_events_lost_to_trim_total", labels) or 0.0


def xadd_trimmed(url: str, camera: str, frames: range, maxlen: int | None = None) -> None:
    """Write events as the sink does, but with exact MAXLEN trimming (``~`` trims only whole nodes of ~100)."""
    client = redis.Redis.from_url(url)
    for frame in frames:
        event = frame_events(camera, frame)[0].with_publish_time(1_700_000_001.0)
        client.xadd(f"{PREFIX}:events:{camera}", event.to_fields(), maxlen=maxlen, approximate=False)
    client.close()


@pytest.mark.integration
def test_a_second_consumer_claims_every_entry_a_dead_consumer_left_unacked(redis_server: Any) -> None:
    publisher = EventPublisher(real_config(redis_server.url), PipelineMetrics())
    for frame in range(7):
        publisher.publish("cam1", frame_events("cam1", frame))
    dead = EventSubscriber(redis_server.url, PREFIX, "cam1", "analytics", "analytics-0", start_id="0", block_ms=50)
    delivered = dead.read()
    assert [message.event.frame_index for message in delivered] == list(range(7))
    dead.close()  # dies without acking anything, and its name never comes back

    survivor = EventSubscriber(
        redis_server.url, PREFIX, "cam1", "analytics", "analytics-1", block_ms=50, count=3, claim_idle_ms=1000, maintenance_interval_s=0
    )
    assert survivor.read() == []  # not idle long enough yet: a live consumer may still be handling them
    time.sleep(1.1)
    handled: list[StreamMessage] = []
    deadline = time.monotonic() + 10.0
    while len(handled) < 7 and time.monotonic() < deadline:
        batch = survivor.read()
        assert len(batch) <= 3
        for message in batch:
            handled.append(message)
            survivor.ack(message.stream, message.message_id)
    assert [message.message_id for message in handled] == [message.message_id for message in delivered]
    assert [message.event for message in handled] == [message.event for message in delivered]
    assert survivor.client.xpending("test:events:cam1", "analytics")["pending"] == 0
    assert survivor.metrics.registry.get_sample_value("ferstream_events_claimed_total", {"camera": "cam1", "group": "analytics"}) == 7
    publisher.publish("cam1", frame_events("cam1", 7))
    assert [message.event.frame_index for message in survivor.read()] == [7]  # and it goes on with new ones
    survivor.close()
    publisher.close()


@pytest.mark.integration
def test_entries_trimmed_before_the_group_read_them_are_counted_once(redis_server: Any) -> None:
    subscriber = EventSubscriber(redis_server.url, PREFIX, "cam1", "g", "g-0", start_id="0", block_ms=50, maintenance_interval_s=0)
    subscriber.ensure_groups()
    xadd_trimmed(redis_server.url, "cam1", range(5))
    first = subscriber.read(count=2)
    assert [message.event.frame_index for message in first] == [0, 1]
    subscriber.ack(first[0].stream, *(message.message_id for message in first))
    assert lost(subscriber, "unread") == 0

    xadd_trimmed(redis_server.url, "cam1", range(5, 30), maxlen=10)  # frames 2-19 go unread
    assert [message.event.frame_index for message in subscriber.read(count=3)] == [20, 21, 22]
    assert lost(subscriber, "unread") == 18
    other = EventSubscriber(redis_server.url, PREFIX, "cam1", "g", "g-1", block_ms=50, maintenance_interval_s=0)
    other.read(count=1)  # another consumer of the group checks too: the same loss is not counted again
    assert lost(other, "unread") == 0

    xadd_trimmed(redis_server.url, "cam1", range(30, 50), maxlen=10)  # the group is at 23 (other took one): 24-39 go
    assert [message.event.frame_index for message in subscriber.read(count=3)] == [40, 41, 42]
    assert lost(subscriber, "unread") == 18 + 16
    subscriber.close()
    other.close()


@pytest.mark.integration
def test_pending_entries_trimmed_before_their_ack_are_counted(redis_server: Any) -> None:
    xadd_trimmed(redis_server.url, "cam1", range(5))
    dead = EventSubscriber(redis_server.url, PREFIX, "cam1", "g", "g-0", start_id="0", block_ms=50)
    assert len(dead.read()) == 5
    dead.close()
    xadd_trimmed(redis_server.url, "cam1", range(5, 15), maxlen=5)  # the 5 pending ones and 5-9 are trimmed
    time.sleep(0.25)
    survivor = EventSubscriber(redis_server.url, PREFIX, "cam1", "g", "g-1", block_ms=50, claim_idle_ms=200, maintenance_interval_s=0)
    got: list[int] = []
    for _ in range(3):  # (a claim_idle_ms shorter than its own handling would claim its own 10-14 again)
        got += [message.event.frame_index for message in survivor.read()]
    assert got == [10, 11, 12, 13, 14]
    assert lost(survivor, "pending") == 5 and lost(survivor, "unread") == 5
    assert survivor.client.xpending("test:events:cam1", "g")["pending"] == 5  # 10-14, delivered and not acked yet
    survivor.close()


def test_subscriber_options_are_checked() -> None:
    with pytest.raises(ValueError, match="claim_idle_ms"):
        EventSubscriber("redis://127.0.0.1:1/0", PREFIX, "cam1", "g", "c", claim_idle_ms=0)
    with pytest.raises(ValueError, match="maintenance_interval_s"):
        EventSubscriber("redis://127.0.0.1:1/0", PREFIX, "cam1", "g", "c", maintenance_interval_s=-1)


# A consumer in its own process: reads every pending event of two cameras, acks the first `acked`
# of each, prints what it acked and what it holds, then hangs until it is killed.
CONSUMER_SCRIPT = """
import json, sys, time
from pipeline.events import EventSubscriber
url, acked = sys.argv[1], int(sys.argv[2])
subscriber = EventSubscriber(url, "test", ["cam1", "cam2"], "analytics", "analytics-0", start_id="0", block_ms=200, claim_idle_ms=None)
got = []
while len(got) < 20:
    got += subscriber.read()
done = [m for camera in ("cam1", "cam2") for m in [m for m in got if m.event.camera_id == camera][:acked]]
for message in done:
    subscriber.ack(message.stream, message.message_id)
held = [m.message_id for m in got if m not in done]
print(json.dumps({"acked": [m.message_id for m in done], "held": held}), flush=True)
time.sleep(600)
"""


@pytest.mark.integration
def test_a_killed_consumer_process_leaves_its_unacked_events_to_another_that_processes_each_once(redis_server: Any) -> None:
    publisher = EventPublisher(real_config(redis_server.url), PipelineMetrics())
    for frame in range(10):
        for camera in ("cam1", "cam2"):
            publisher.publish(camera, frame_events(camera, frame))
    assert publisher.flush(5.0)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3])}
    consumer = subprocess.Popen([sys.executable, "-c", CONSUMER_SCRIPT, redis_server.url, "3"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert consumer.stdout is not None
        line = consumer.stdout.readline()
        assert line, f"the consumer exited with {consumer.poll()}"
        report = json.loads(line)
    finally:
        consumer.send_signal(signal.SIGKILL)  # dies with 14 events delivered and not acked: no close, no goodbye
        consumer.wait(10)
    assert len(report["acked"]) == 6 and len(report["held"]) == 14

    survivor = EventSubscriber(
        redis_server.url, PREFIX, ["cam1", "cam2"], "analytics", "analytics-1", block_ms=50, claim_idle_ms=500, maintenance_interval_s=0
    )
    processed: list[str] = []
    deadline = time.monotonic() + 10.0
    while len(processed) < 14 and time.monotonic() < deadline:
        for message in survivor.read():
            processed.append(message.message_id)
            survivor.ack(message.stream, message.message_id)
        time.sleep(0.1)
    for _ in range(3):
        processed += [message.message_id for message in survivor.read()]  # nothing comes twice, nothing acked comes back
    assert sorted(processed) == sorted(report["held"])
    for camera in ("cam1", "cam2"):
        assert survivor.client.xpending(f"{PREFIX}:events:{camera}", "analytics")["pending"] == 0
    survivor.close()
    publisher.close()
