"""The Redis Streams sink behind the publisher: one pipelined round-trip per frame, MAXLEN ~, the outage
buffer, ordering and retry against Redis errors.

The first tests use a fake Redis client; the integration tests run against a real redis-server
(the ``redis_server`` fixture), including outages made by stopping it and starting it again on
the same port.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from pipeline.config import BackoffConfig, EventsConfig
from pipeline.events import EventPublisher, ExpressionEvent, RedisStreamSink, stream_key, validate_event_dict
from pipeline.metrics import PipelineMetrics
from tests.pipeline.events.helpers import CAPTURE_TIME, PREFIX, dropped, frame_events, real_config, sample


def test_stream_key() -> None:
    assert stream_key("ferstream", "door-1") == "ferstream:events:door-1"


# -- the publisher through the Redis sink with a fake client -----------------------------------------------------------------


class FakePipeline:
    def __init__(self, client: FakeRedis) -> None:
        self.client = client
        self.commands: list[tuple[str, dict[str, str], int, bool]] = []

    def xadd(self, key: str, fields: dict[str, str], maxlen: int, approximate: bool) -> None:
        self.commands.append((key, fields, maxlen, approximate))

    def execute(self) -> list[str]:
        with self.client.lock:  # like a server: one batch at a time
            self.client.round_trips += 1
            if self.client.error is not None:
                raise self.client.error
            self.client.written.extend((key, fields) for key, fields, _, _ in self.commands)
            self.client.maxlens.update((maxlen, approximate) for _, _, maxlen, approximate in self.commands)
            return ["0-1"] * len(self.commands)


class FakeRedis:
    def __init__(self) -> None:
        self.error: Exception | None = None
        self.lock = threading.Lock()
        self.round_trips = 0
        self.written: list[tuple[str, dict[str, str]]] = []
        self.maxlens: set[tuple[int, bool]] = set()

    def pipeline(self, transaction: bool = True) -> FakePipeline:
        assert transaction is False
        return FakePipeline(self)

    def close(self) -> None:  # pragma: no cover - the publisher only closes clients it made
        raise AssertionError("the publisher must not close a client it was given")


def fake_config(**overrides: Any) -> EventsConfig:
    # A retry delay far longer than any test: the flusher only tries when flush() kicks it.
    values: dict[str, Any] = {"stream_prefix": PREFIX, "maxlen": 50, "retry": BackoffConfig(initial_s=60, max_s=60, jitter=0)}
    return EventsConfig(**(values | overrides))


def written_frames(client: FakeRedis) -> list[tuple[str, int]]:
    return [(key, int(fields["frame_index"])) for key, fields in client.written]


def fake_publisher(config: EventsConfig, metrics: PipelineMetrics, client: FakeRedis, **kwargs: Any) -> EventPublisher:
    return EventPublisher(config, metrics, RedisStreamSink(config, client), **kwargs)  # type: ignore[arg-type]


def test_publish_writes_a_frame_in_one_round_trip() -> None:
    client, metrics = FakeRedis(), PipelineMetrics()
    publisher = fake_publisher(fake_config(), metrics, client, wall_clock=lambda: CAPTURE_TIME + 0.5)
    published = publisher.publish("cam1", frame_events("cam1", 0, faces=3))
    assert client.round_trips == 1 and len(client.written) == 3
    assert {key for key, _ in client.written} == {"test:events:cam1"}
    assert client.maxlens == {(50, True)}
    assert [event.publish_time for event in published] == [CAPTURE_TIME + 0.5] * 3
    assert all(fields["publish_time"] == repr(CAPTURE_TIME + 0.5) for _, fields in client.written)
    assert sample(metrics, "ferstream_events_published_total", {"camera": "cam1"}) == 3
    assert sample(metrics, "ferstream_end_to_end_latency_seconds_count", {"camera": "cam1"}) == 3
    assert sample(metrics, "ferstream_end_to_end_latency_seconds_sum", {"camera": "cam1"}) == pytest.approx(1.5)
    assert sample(metrics, "ferstream_stage_latency_seconds_count", {"stage": "publish"}) == 1
    assert publisher.publish("cam1", []) == [] and client.round_trips == 1  # nothing to write, no round-trip
    publisher.close()


def test_on_change_policy_applies_in_publish() -> None:
    client = FakeRedis()
    publisher = fake_publisher(fake_config(policy="on_change", heartbeat_s=100), PipelineMetrics(), client)
    assert len(publisher.publish("cam1", frame_events("cam1", 0, faces=2))) == 2
    assert publisher.publish("cam1", frame_events("cam1", 1, faces=2)) == []
    assert [event.track_id for event in publisher.publish("cam1", frame_events("cam1", 2, faces=3))] == [2]
    publisher.policy.forget("cam1", 0)
    assert [event.track_id for event in publisher.publish("cam1", frame_events("cam1", 3, faces=1))] == [0]
    assert client.round_trips == 3  # the empty frame cost no round-trip
    publisher.close()


@pytest.mark.parametrize("error", [redis.ConnectionError("refused"), redis.TimeoutError("timed out"), OSError("broken pipe")])
def test_publish_never_raises_when_redis_fails(error: Exception) -> None:
    client, metrics = FakeRedis(), PipelineMetrics()
    client.error = error
    publisher = fake_publisher(fake_config(), metrics, client)
    assert len(publisher.publish("cam1", frame_events("cam1", 0, faces=2))) == 2
    assert publisher.buffered == 2
    assert sample(metrics, "ferstream_redis_errors_total") == 1
    assert sample(metrics, "ferstream_events_published_total", {"camera": "cam1"}) == 0
    client.error = None
    assert publisher.flush(5.0)
    publisher.close()


def test_buffer_is_bounded_and_drops_the_oldest() -> None:
    client, metrics = FakeRedis(), PipelineMetrics()
    client.error = redis.ConnectionError("down")
    publisher = fake_publisher(fake_config(buffer_max_events=5), metrics, client)
    for frame in range(4):  # 4 frames x 2 cameras x 1 face = 8 events, 3 too many
        publisher.publish("cam1", frame_events("cam1", frame))
        publisher.publish("cam2", frame_events("cam2", frame))

    assert publisher.buffered == 5
    assert sample(metrics, "ferstream_events_buffered") == 5
    # The oldest three: cam1/0, cam2/0, cam1/1.
    assert dropped(metrics, "cam1") == 2 and dropped(metrics, "cam2") == 1
    # Only the first write reached the client: while buffering, frames cost no round-trip.
    assert client.round_trips == 1 and sample(metrics, "ferstream_redis_errors_total") == 1

    assert not publisher.flush(0.5)  # still down: the kicked retry fails too
    assert publisher.buffered == 5 and dropped(metrics, "cam1") == 2
    assert sample(metrics, "ferstream_redis_errors_total") == 2

    client.error = None
    assert publisher.flush(5.0)
    expected = [("test:events:cam2", 1), ("test:events:cam1", 2), ("test:events:cam2", 2), ("test:events:cam1", 3), ("test:events:cam2", 3)]
    assert written_frames(client) == expected
    assert sample(metrics, "ferstream_events_buffered") == 0
    assert sample(metrics, "ferstream_events_published_total", {"camera": "cam1"}) == 2

    # Recovered: the next frame is written directly again, behind the backlog.
    publisher.publish("cam1", frame_events("cam1", 4))
    assert written_frames(client)[-1] == ("test:events:cam1", 4)
    publisher.close()


def test_buffered_events_are_restamped_when_delivered() -> None:
    client, now = FakeRedis(), [CAPTURE_TIME + 1.0]
    client.error = redis.ConnectionError("down")
    metrics = PipelineMetrics()
    publisher = fake_publisher(fake_config(), metrics, client, wall_clock=lambda: now[0])
    publisher.publish("cam1", frame_events("cam1", 0))
    client.error, now[0] = None, CAPTURE_TIME + 30.0
    assert publisher.flush(5.0)
    assert client.written[0][1]["publish_time"] == repr(CAPTURE_TIME + 30.0)
    # The outage shows up in the end-to-end latency.
    assert sample(metrics, "ferstream_end_to_end_latency_seconds_sum", {"camera": "cam1"}) == pytest.approx(30.0)
    publisher.close()


def test_close_counts_undeliverable_events_and_later_publishes() -> None:
    client, metrics = FakeRedis(), PipelineMetrics()
    client.error = redis.ConnectionError("down")
    publisher = fake_publisher(fake_config(), metrics, client)
    publisher.publish("cam1", frame_events("cam1", 0, faces=3))
    publisher.close(timeout_s=0.2)
    assert dropped(metrics, "cam1", "closed") == 3
    assert sample(metrics, "ferstream_events_buffered") == 0
    publisher.publish("cam1", frame_events("cam1", 1, faces=2))  # after close: counted, not raised
    assert dropped(metrics, "cam1", "closed") == 5
    publisher.close()  # idempotent


def test_order_holds_per_camera_through_flapping_redis() -> None:
    """Cameras publish from their own threads while Redis flaps; each camera's events must
    reach Redis complete and in order, whichever path (direct or backlog) carried them."""
    client, metrics = FakeRedis(), PipelineMetrics()
    config = fake_config(buffer_max_events=10_000, retry=BackoffConfig(initial_s=0.01, max_s=0.02, jitter=0))
    publisher = fake_publisher(config, metrics, client, drain_batch=7)
    cameras, frames = ("cam1", "cam2", "cam3"), 300
    done = threading.Event()

    def camera(camera_id: str) -> None:
        for frame in range(frames):
            publisher.publish(camera_id, frame_events(camera_id, frame, faces=2))
            if frame % 10 == 0:
                time.sleep(0.001)

    def flap() -> None:
        while not done.is_set():
            client.error = redis.ConnectionError("flap") if client.error is None else None
            time.sleep(0.003)
        client.error = None

    threads = [threading.Thread(target=camera, args=(camera_id,)) for camera_id in cameras]
    flapper = threading.Thread(target=flap)
    flapper.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    flapper.join()
    assert publisher.flush(5.0)

    assert sample(metrics, "ferstream_redis_errors_total") > 0  # the flapping did hit writes
    for camera_id in cameras:
        got = [(int(fields["frame_index"]), int(fields["track_id"])) for key, fields in client.written if key == f"test:events:{camera_id}"]
        assert got == [(frame, track) for frame in range(frames) for track in range(2)]
        assert dropped(metrics, camera_id) == 0
    publisher.close()


def test_a_silent_server_blocks_a_frame_at_most_socket_timeout() -> None:
    # A listening socket that never answers: connect succeeds, the reply never comes.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
        metrics = PipelineMetrics()
        publisher = EventPublisher(fake_config(redis_url=url, socket_timeout_s=0.3), metrics)
        started = time.monotonic()
        publisher.publish("cam1", frame_events("cam1", 0))
        first = time.monotonic() - started
        started = time.monotonic()
        publisher.publish("cam1", frame_events("cam1", 1))
        second = time.monotonic() - started
        assert 0.25 <= first < 1.5  # one socket timeout, no hidden redis-py retries
        assert second < 0.05  # later frames go straight to the buffer
        assert publisher.buffered == 2 and sample(metrics, "ferstream_redis_errors_total") == 1
        publisher.close(timeout_s=0.1)


# -- integration: a real redis-server -------------------------------------------------------------


@pytest.fixture
def reader(redis_server: Any) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


def stored(client: redis.Redis, camera_id: str) -> list[ExpressionEvent]:
    return [ExpressionEvent.from_fields(fields) for _id, fields in client.xrange(stream_key(PREFIX, camera_id))]


@pytest.mark.integration
def test_events_land_in_the_camera_stream_and_match_the_schema(redis_server: Any, reader: redis.Redis) -> None:
    metrics = PipelineMetrics()
    publisher = EventPublisher(real_config(redis_server.url), metrics)
    before = time.time()
    for frame in range(3):
        publisher.publish("cam1", frame_events("cam1", frame, faces=2))
    publisher.publish("cam2", frame_events("cam2", 0))

    events = stored(reader, "cam1")
    assert [(event.frame_index, event.track_id) for event in events] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    for event in events:
        validate_event_dict(event.to_json_dict())
        assert before <= event.publish_time <= time.time()
    assert [event.camera_id for event in stored(reader, "cam2")] == ["cam2"]
    assert sample(metrics, "ferstream_events_published_total", {"camera": "cam1"}) == 6
    assert sample(metrics, "ferstream_redis_errors_total") == 0
    publisher.close()


@pytest.mark.integration
def test_maxlen_trims_the_stream(redis_server: Any, reader: redis.Redis) -> None:
    publisher = EventPublisher(real_config(redis_server.url, maxlen=10), PipelineMetrics())
    for frame in range(100):
        publisher.publish("cam1", frame_events("cam1", frame, faces=5))
    length = reader.xlen(stream_key(PREFIX, "cam1"))
    # "~" trims whole radix-tree nodes (100 entries by default), so the length is near, not at, 10.
    assert 10 <= length <= 10 + 100
    assert stored(reader, "cam1")[-1].frame_index == 99
    publisher.close()


@pytest.mark.integration
def test_outage_is_buffered_and_delivered_in_order(redis_server: Any, reader: redis.Redis) -> None:
    metrics = PipelineMetrics()
    publisher = EventPublisher(real_config(redis_server.url, buffer_max_events=100), metrics)
    publisher.publish("cam1", frame_events("cam1", 0))
    redis_server.stop()

    started = time.monotonic()
    for frame in range(1, 11):  # 10 frames x 2 cameras x 2 faces = 40 events
        publisher.publish("cam1", frame_events("cam1", frame, faces=2))
        publisher.publish("cam2", frame_events("cam2", frame, faces=2))
    assert time.monotonic() - started < 2.0  # the outage does not stall frames
    assert publisher.buffered == 40
    assert sample(metrics, "ferstream_events_buffered") == 40

    redis_server.start()  # same port; no persistence, so only what is delivered now is there
    assert publisher.flush(10.0)
    for camera in ("cam1", "cam2"):
        assert [(event.frame_index, event.track_id) for event in stored(reader, camera)] == [(f, t) for f in range(1, 11) for t in range(2)]
    assert dropped(metrics, "cam1") == 0 and dropped(metrics, "cam2") == 0
    assert sample(metrics, "ferstream_events_buffered") == 0
    assert sample(metrics, "ferstream_redis_errors_total") >= 1
    assert sample(metrics, "ferstream_events_published_total", {"camera": "cam1"}) == 21

    publisher.publish("cam1", frame_events("cam1", 11))  # direct again, after the backlog
    assert stored(reader, "cam1")[-1].frame_index == 11
    publisher.close()


@pytest.mark.integration
def test_backlog_is_delivered_without_an_explicit_flush(redis_server: Any, reader: redis.Redis) -> None:
    publisher = EventPublisher(real_config(redis_server.url), PipelineMetrics())
    redis_server.stop()
    for frame in range(5):
        publisher.publish("cam1", frame_events("cam1", frame))
    redis_server.start()
    deadline = time.monotonic() + 10.0
    while reader.xlen(stream_key(PREFIX, "cam1")) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [event.frame_index for event in stored(reader, "cam1")] == [0, 1, 2, 3, 4]
    publisher.close()


@pytest.mark.integration
def test_outage_past_the_buffer_drops_exactly_the_overflow(redis_server: Any, reader: redis.Redis) -> None:
    metrics = PipelineMetrics()
    publisher = EventPublisher(real_config(redis_server.url, buffer_max_events=20), metrics)
    redis_server.stop()
    for frame in range(10):  # 10 frames x 5 faces = 50 events, 30 over the bound
        publisher.publish("cam1", frame_events("cam1", frame, faces=5))
    assert publisher.buffered == 20
    redis_server.start()
    assert publisher.flush(10.0)

    assert [(event.frame_index, event.track_id) for event in stored(reader, "cam1")] == [(f, t) for f in range(6, 10) for t in range(5)]
    assert dropped(metrics, "cam1") == 30
    assert sample(metrics, "ferstream_events_published_total", {"camera": "cam1"}) == 20
    publisher.close()
