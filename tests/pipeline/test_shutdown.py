"""A worker's shutdown: stop every camera, flush the outage buffer, release the leases, in that order
and within its budget, against a real redis-server (stopped and restarted for the outage)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

import pytest
import redis

from pipeline.config import BackoffConfig
from pipeline.events import EventPublisher, stream_key
from pipeline.metrics import PipelineMetrics
from pipeline.registry import CameraRegistry, ShardWorker
from pipeline.shutdown import ShutdownBudget, shut_down_worker, stop_cameras
from tests.conftest import RedisServer
from tests.pipeline.events.helpers import PREFIX, dropped, frame_events, real_config
from tests.pipeline.test_registry import camera

CAMERAS = ("a", "b", "c", "d")


def test_stop_cameras_stops_all_at_once_and_names_the_ones_still_stopping() -> None:
    unblock = threading.Event()
    stopped: list[str] = []

    def stop(camera_id: str, seconds: float) -> None:
        time.sleep(seconds)
        if camera_id == "stuck":
            unblock.wait(10.0)
        stopped.append(camera_id)

    stops = [(camera_id, lambda camera_id=camera_id: stop(camera_id, 0.3)) for camera_id in ("a", "b", "c", "stuck")]
    started = time.monotonic()
    assert stop_cameras(stops, timeout_s=0.8) == ["stuck"]
    assert 0.3 <= time.monotonic() - started < 1.2  # 3 x 0.3 s one after the other would not fit, nor would the stuck one
    assert sorted(stopped) == ["a", "b", "c"]
    unblock.set()


def test_the_budget_adds_up_every_step() -> None:
    assert ShutdownBudget(stop_s=8.0, flush_s=10.0).bound_s(socket_timeout_s=2.0) == 8.0 + 10.0 + 3.0 + 4.0


class OrderRecordingRegistry(CameraRegistry):
    """Counts the events in the streams when the leases are released: the flush must come first."""

    def __init__(self, client: redis.Redis, prefix: str, lease_s: float) -> None:
        super().__init__(client, prefix, lease_s)
        self.events_at_release: int | None = None

    def release_many(self, camera_ids: Iterable[str], owner: str) -> None:
        self.events_at_release = sum(int(self.client.xlen(stream_key(PREFIX, camera_id))) for camera_id in CAMERAS)  # type: ignore[arg-type]
        super().release_many(camera_ids, owner)


def stored_keys(client: redis.Redis) -> list[tuple[str, int, int]]:
    keys = []
    for camera_id in CAMERAS:
        for _id, fields in client.xrange(stream_key(PREFIX, camera_id)):
            keys.append((fields[b"camera_id"].decode(), int(fields[b"frame_index"]), int(fields[b"track_id"])))
    return keys


@pytest.mark.integration
def test_events_buffered_in_an_outage_are_all_in_the_stream_after_shutdown_and_the_leases_are_released_last(
    redis_server: RedisServer,
) -> None:
    client = redis.Redis.from_url(redis_server.url, socket_timeout=2)
    registry = OrderRecordingRegistry(client, PREFIX, lease_s=30.0)
    for camera_id in CAMERAS:
        registry.add(camera(camera_id))
    metrics = PipelineMetrics()
    # A retry far longer than the test: only the shutdown's flush can deliver the backlog.
    publisher = EventPublisher(real_config(redis_server.url, retry=BackoffConfig(initial_s=60, max_s=60, jitter=0)), metrics)
    decoding = set(CAMERAS)
    events_at_stop: list[int] = []

    def stop(camera_id: str) -> None:
        time.sleep(0.2)
        events_at_stop.append(sum(int(client.xlen(stream_key(PREFIX, other))) for other in CAMERAS))  # type: ignore[arg-type]
        decoding.discard(camera_id)

    worker = ShardWorker(registry, "w1", start=lambda camera: None, stop=stop)
    worker.reconcile(max_cameras=8)
    assert sorted(worker.running) == list(CAMERAS)

    redis_server.stop()
    for frame in range(50):  # 4 cameras x 50 frames x 2 faces = 400 events, all buffered
        for camera_id in CAMERAS:
            publisher.publish(camera_id, frame_events(camera_id, frame, faces=2))
    assert publisher.buffered == 400
    redis_server.start()  # same port, empty (no persistence): the leases went with the old process
    for camera_id in CAMERAS:
        assert registry.claim(camera_id, "w1")  # as the next renewal would have found them gone, re-take them for the test
    assert publisher.buffered == 400  # nothing delivered yet: the retry is a minute away

    report = shut_down_worker(worker, publisher, ShutdownBudget(stop_s=5.0, flush_s=10.0))

    assert not decoding and report.still_stopping == []
    assert events_at_stop == [0, 0, 0, 0]  # every camera stopped before the flush
    assert registry.events_at_release == 400  # and the flush was done before the leases were released
    keys = stored_keys(client)
    assert len(keys) == len(set(keys)) == 400
    assert set(keys) == {(camera_id, frame, track) for camera_id in CAMERAS for frame in range(50) for track in range(2)}
    assert report.undelivered == 0 and all(dropped(metrics, camera_id, "closed") == 0 for camera_id in CAMERAS)
    assert sorted(report.released) == list(CAMERAS)
    assert registry.owners(CAMERAS) == dict.fromkeys(CAMERAS)
    assert client.zscore(registry.workers_key, "w1") is None
    client.close()


@pytest.mark.integration
def test_a_shutdown_with_redis_still_down_ends_within_its_bound_and_counts_what_it_could_not_deliver(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    registry = CameraRegistry(client, PREFIX, lease_s=30.0)
    registry.add(camera("a"))
    metrics = PipelineMetrics()
    publisher = EventPublisher(real_config(redis_server.url, socket_timeout_s=0.5), metrics)
    worker = ShardWorker(registry, "w1", start=lambda camera: None, stop=lambda camera_id: None)
    worker.reconcile(max_cameras=8)
    redis_server.stop()
    for frame in range(10):
        publisher.publish("a", frame_events("a", frame))
    budget = ShutdownBudget(stop_s=1.0, flush_s=1.0)
    started = time.monotonic()
    report = shut_down_worker(worker, publisher, budget)
    assert time.monotonic() - started < budget.bound_s(socket_timeout_s=0.5)
    assert report.undelivered == 10 and dropped(metrics, "a", "closed") == 10
    assert report.released == []  # Redis is down: the lease expires on its own
