"""Events: encoding, schema, emission policy, the buffering publisher, and the readers.

Unit tests use a fake Redis client; the integration tests run against a real redis-server
(the ``redis_server`` fixture), including outages made by stopping it and starting it again
on the same port.
"""

from __future__ import annotations

import io
import json
import socket
import threading
import time
from collections.abc import Iterator
from itertools import islice
from typing import Any

import numpy as np
import pytest
import redis

from pipeline.config import BackoffConfig, EventsConfig
from pipeline.events import (
    EmissionPolicy,
    EventDecodeError,
    EventPublisher,
    EventSubscriber,
    EventValidationError,
    ExpressionEvent,
    event_schema,
    stream_key,
    tail,
    validate_event_dict,
)
from pipeline.metrics import PipelineMetrics

PREFIX = "test"
CAPTURE_TIME = 1_700_000_000.25


def make_event(**overrides: Any) -> ExpressionEvent:
    values: dict[str, Any] = {
        "camera_id": "cam1",
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


# -- encoding -------------------------------------------------------------------------------------


def test_fields_round_trip() -> None:
    event = make_event(publish_time=CAPTURE_TIME + 0.125, pts_s=1 / 3)
    fields = event.to_fields()
    assert all(isinstance(key, str) and isinstance(value, str) for key, value in fields.items())
    assert fields["box"] == "[10,20,110,140]"
    assert json.loads(fields["probabilities"]) == event.probabilities
    assert fields["schema_version"] == "1"
    assert ExpressionEvent.from_fields(fields) == event
    # As redis-py returns them without decode_responses.
    raw = {key.encode(): value.encode() for key, value in fields.items()}
    decoded = ExpressionEvent.from_fields(raw)
    assert decoded == event
    assert decoded.pts_s == 1 / 3  # floats round-trip exactly


def test_unknown_fields_are_ignored() -> None:
    fields = make_event(publish_time=CAPTURE_TIME + 1).to_fields() | {"added_later": "x"}
    assert ExpressionEvent.from_fields(fields).emotion == "happy"


def test_numpy_values_are_normalised() -> None:
    event = make_event(detector_score=np.float32(0.5), frame_index=np.int64(9), box=tuple(np.array([1, 2, 3, 4], dtype=np.int32)))
    assert type(event.detector_score) is float and type(event.frame_index) is int
    assert all(type(value) is int for value in event.box)
    assert event.to_fields()["detector_score"] == "0.5"


def test_float_box_is_refused() -> None:
    with pytest.raises(EventDecodeError) as caught:
        make_event(box=(1.5, 2, 3, 4))
    assert caught.value.field == "box"


def test_event_is_immutable() -> None:
    probabilities = {"happy": 0.9, "sad": 0.1}
    event = make_event(probabilities=probabilities, emotion="happy", confidence=0.9)
    probabilities["happy"] = 0.0
    assert event.probabilities["happy"] == 0.9
    with pytest.raises(AttributeError):
        event.emotion = "sad"  # type: ignore[misc]
    assert hash(event) == hash(make_event(probabilities={"happy": 0.9, "sad": 0.1}, emotion="happy", confidence=0.9))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("schema_version", "2"),
        ("schema_version", "one"),
        ("frame_index", "7.5"),
        ("track_id", ""),
        ("pts_s", "abc"),
        ("capture_time", "nan"),
        ("publish_time", "inf"),
        ("box", "[1,2,3]"),
        ("box", "[1,2,3,4.5]"),
        ("box", "{not json"),
        ("probabilities", "[]"),
        ("probabilities", '{"happy":"high"}'),
        ("camera_id", ""),
        ("emotion", b"\xff\xfe"),
        ("confidence", "NaN"),
    ],
)
def test_from_fields_errors_name_the_field(field: str, value: str | bytes) -> None:
    fields: dict[str, str | bytes] = dict(make_event(publish_time=CAPTURE_TIME + 1).to_fields())
    fields[field] = value
    with pytest.raises(ValueError, match=repr(field)) as caught:
        ExpressionEvent.from_fields(fields)
    assert isinstance(caught.value, EventDecodeError) and caught.value.field == field


def test_from_fields_missing_field() -> None:
    fields = make_event(publish_time=CAPTURE_TIME + 1).to_fields()
    del fields["model_id"]
    with pytest.raises(ValueError, match="'model_id': missing"):
        ExpressionEvent.from_fields(fields)


def test_stream_key() -> None:
    assert stream_key("ferstream", "door-1") == "ferstream:events:door-1"


# -- schema ---------------------------------------------------------------------------------------


def test_schema_is_valid_draft_2020_12_and_describes_every_field() -> None:
    import jsonschema

    schema = event_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert set(schema["required"]) == set(make_event().to_json_dict())
    assert all("description" in prop for prop in schema["properties"].values())


def test_schema_accepts_a_published_event() -> None:
    data = make_event(publish_time=CAPTURE_TIME + 0.1).to_json_dict()
    validate_event_dict(data)
    validate_event_dict(json.loads(json.dumps(data)))  # and after a trip through JSON


@pytest.mark.parametrize(
    ("path", "change"),
    [
        ("confidence", {"confidence": 1.5}),
        ("schema_version", {"schema_version": 2}),
        ("box", {"box": [1, 2, 3]}),
        ("box.3", {"box": [1, 2, 3, "4"]}),
        ("camera_id", {"camera_id": "bad camera"}),
        ("probabilities.happy", {"probabilities": {"happy": -0.1}}),
        ("publish_time", {"publish_time": 0.0}),  # never stamped by a publisher
        ("<root>", {"extra": 1}),
        ("emotion", {"emotion": "angry"}),  # not one of the probabilities' classes
    ],
)
def test_schema_rejects_bad_events(path: str, change: dict[str, Any]) -> None:
    data = make_event(publish_time=CAPTURE_TIME + 0.1).to_json_dict() | change
    with pytest.raises(EventValidationError) as caught:
        validate_event_dict(data)
    assert caught.value.path == path


def test_schema_rejects_a_missing_field() -> None:
    data = make_event(publish_time=CAPTURE_TIME + 0.1).to_json_dict()
    del data["track_id"]
    with pytest.raises(EventValidationError, match="track_id"):
        validate_event_dict(data)


# -- emission policy ------------------------------------------------------------------------------


def test_every_face_emits_everything() -> None:
    policy = EmissionPolicy("every_face")
    events = frame_events("cam1", 0, faces=3)
    assert policy.select("cam1", events, now=0.0) == events
    assert policy.select("cam1", events, now=0.1) == events
    assert policy.tracked() == 0  # keeps no state


def test_on_change_emits_new_changed_and_heartbeat() -> None:
    policy = EmissionPolicy("on_change", heartbeat_s=5.0)

    def emitted(now: float, emotion: str, track_id: int = 1) -> bool:
        return bool(policy.select("cam1", [make_event(track_id=track_id, emotion=emotion)], now=now))

    assert emitted(0.0, "happy")  # new track
    assert not emitted(1.0, "happy")
    assert not emitted(4.9, "happy")
    assert emitted(5.0, "happy")  # heartbeat
    assert not emitted(6.0, "happy")
    assert emitted(6.5, "sad")  # change
    assert not emitted(7.0, "sad")
    assert emitted(7.5, "happy")  # change back
    assert not emitted(12.0, "happy")  # the heartbeat counts from the last emission (7.5)
    assert emitted(12.5, "happy")
    assert emitted(12.6, "happy", track_id=2)  # another new track


def test_on_change_selects_per_face_within_a_frame() -> None:
    policy = EmissionPolicy("on_change", heartbeat_s=5.0)
    policy.select("cam1", [make_event(track_id=1), make_event(track_id=2)], now=0.0)
    frame = [make_event(track_id=1, emotion="happy"), make_event(track_id=2, emotion="sad"), make_event(track_id=3)]
    assert [event.track_id for event in policy.select("cam1", frame, now=1.0)] == [2, 3]


def test_on_change_state_is_per_camera_and_forgettable() -> None:
    policy = EmissionPolicy("on_change", heartbeat_s=5.0)
    policy.select("cam1", [make_event(track_id=1)], now=0.0)
    assert policy.select("cam2", [make_event(camera_id="cam2", track_id=1)], now=0.1)  # same id, other camera
    assert policy.tracked() == 2

    policy.forget("cam1", 1)
    assert policy.tracked("cam1") == 0
    assert policy.select("cam1", [make_event(track_id=1)], now=1.0)  # new again
    policy.forget("cam1", 99)  # unknown: no error
    policy.forget_camera("cam2")
    policy.forget_camera("nope")
    assert policy.tracked() == 1


def test_on_change_expires_tracks_never_forgotten() -> None:
    policy = EmissionPolicy("on_change", heartbeat_s=1.0, idle_expiry_s=10.0)
    for track_id in range(100):
        policy.select("cam1", [make_event(track_id=track_id)], now=float(track_id))
    assert policy.tracked("cam1") <= 11  # only the tracks seen in the last 10 s survive


def test_policy_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="sometimes"):
        EmissionPolicy("sometimes")  # type: ignore[arg-type]


# -- publisher with a fake client -----------------------------------------------------------------


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


def test_publish_writes_a_frame_in_one_round_trip() -> None:
    client, metrics = FakeRedis(), PipelineMetrics()
    publisher = EventPublisher(fake_config(), metrics, client=client, wall_clock=lambda: CAPTURE_TIME + 0.5)  # type: ignore[arg-type]
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
    publisher = EventPublisher(fake_config(policy="on_change", heartbeat_s=100), PipelineMetrics(), client=client)  # type: ignore[arg-type]
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
    publisher = EventPublisher(fake_config(), metrics, client=client)  # type: ignore[arg-type]
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
    publisher = EventPublisher(fake_config(buffer_max_events=5), metrics, client=client)  # type: ignore[arg-type]
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
    publisher = EventPublisher(fake_config(), metrics, client=client, wall_clock=lambda: now[0])  # type: ignore[arg-type]
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
    publisher = EventPublisher(fake_config(), metrics, client=client)  # type: ignore[arg-type]
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
    config = fake_config(buffer_max_events=10_000, retry=BackoffConfig(initial_s=0.001, max_s=0.005, jitter=0))
    publisher = EventPublisher(config, metrics, client=client, drain_batch=7)  # type: ignore[arg-type]
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


def real_config(url: str, **overrides: Any) -> EventsConfig:
    values: dict[str, Any] = {
        "redis_url": url,
        "stream_prefix": PREFIX,
        "retry": BackoffConfig(initial_s=0.05, max_s=0.2, jitter=0),
        "socket_timeout_s": 1.0,
    }
    return EventsConfig(**(values | overrides))


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
