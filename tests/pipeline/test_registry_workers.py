"""Several ingest workers sharing cameras through the registry (as IngestDeployment._reconcile drives them), and
lease fencing, against a real redis-server."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
import redis

from pipeline.config import SourceConfig
from pipeline.registry import CameraRegistry, LeaseFence, ReconcilePlan, ShardWorker
from tests.conftest import RedisServer
from tests.pipeline.registry_support import PREFIX, camera, lease_key, wait_until_gone

# -- several workers through the registry, as IngestDeployment._reconcile drives it ------------


class Worker(ShardWorker):
    """A ShardWorker whose sessions are only bookkeeping (no decoding)."""

    def __init__(self, registry: CameraRegistry, worker_id: str, capacity: int) -> None:
        super().__init__(registry, worker_id, start=lambda camera: None, stop=lambda camera_id: None)
        self.capacity = capacity

    def reconcile(self, max_cameras: int | None = None) -> ReconcilePlan:  # type: ignore[override]
        return super().reconcile(self.capacity if max_cameras is None else max_cameras)


def owners(registry: CameraRegistry, camera_ids: list[str]) -> dict[str, str | None]:
    return {camera_id: registry.owner(camera_id) for camera_id in camera_ids}


@pytest.mark.integration
def test_workers_share_cameras_without_double_ownership_and_take_over_a_dead_ones(client: redis.Redis) -> None:
    ids = ["a", "b", "c", "d"]
    registry = CameraRegistry(client, PREFIX, lease_s=0.2)
    for camera_id in ids:
        registry.add(camera(camera_id))
    first, second = Worker(registry, "w1", capacity=10), Worker(registry, "w2", capacity=10)

    first.reconcile()
    second.reconcile()
    assert set(first.running) == set(ids) and set(second.running) == set()
    assert set(owners(registry, ids).values()) == {"w1"}

    # The API removes a camera: its owner stops it and frees the lease.
    registry.remove("d")
    first.reconcile()
    assert set(first.running) == {"a", "b", "c"} and registry.owner("d") is None

    # w1 dies (stops renewing): once its leases expire, w2 takes its cameras over.
    for camera_id in ("a", "b", "c"):
        wait_until_gone(client, lease_key(camera_id))
    second.reconcile()
    assert set(second.running) == {"a", "b", "c"}
    assert set(owners(registry, ["a", "b", "c"]).values()) == {"w2"}

    # w1 comes back: its renewals fail, so it stops its stale sessions instead of double-decoding.
    first.reconcile()
    assert set(first.running) == set()
    assert set(owners(registry, ["a", "b", "c"]).values()) == {"w2"}


@pytest.mark.integration
def test_cameras_beyond_one_workers_capacity_are_claimed_by_another(registry: CameraRegistry) -> None:
    ids = ["a", "b", "c"]
    for camera_id in ids:
        registry.add(camera(camera_id))
    workers = [Worker(registry, "w1", capacity=2), Worker(registry, "w2", capacity=2)]
    for _round in range(3):
        for worker in workers:
            worker.reconcile()
    assert all(owners(registry, ids).values()), f"unowned cameras: {owners(registry, ids)}"


@pytest.mark.integration
def test_start_up_cameras_are_seeded_once(registry: CameraRegistry) -> None:
    assert registry.seed([camera("a"), camera("b")]) == ["a", "b"]
    registry.remove("a")
    # The service restarts with the same cameras file: the camera removed through the API stays removed.
    assert registry.seed([camera("a"), camera("b"), camera("c")]) == ["c"]
    assert sorted(registry.cameras()) == ["b", "c"]


@pytest.mark.integration
def test_live_workers_split_the_cameras_fairly(registry: CameraRegistry) -> None:
    ids = ["a", "b", "c", "d", "e"]
    for camera_id in ids:
        registry.add(camera(camera_id))
    first, second = Worker(registry, "w1", capacity=10), Worker(registry, "w2", capacity=10)
    registry.heartbeat("w2")  # both replicas are up before the first reconcile
    first.reconcile()
    second.reconcile()
    assert sorted(first.running) == ["a", "b", "c"] and sorted(second.running) == ["d", "e"]


@pytest.mark.integration
def test_a_camera_that_fails_to_start_is_released_for_another_try(registry: CameraRegistry) -> None:
    registry.add(camera("a"))

    def fail(_camera: SourceConfig) -> None:
        raise RuntimeError("the classifier is not up yet")

    worker = ShardWorker(registry, "w1", start=fail, stop=lambda camera_id: None)
    worker.reconcile(max_cameras=4)
    assert worker.running == {} and registry.owner("a") is None


def test_the_event_reader_acl_of_security_md_reads_events_but_not_the_registry(client: redis.Redis, redis_server: RedisServer) -> None:
    # The recipe exactly as SECURITY.md prints it, so the document cannot drift from what works.
    text = (Path(__file__).resolve().parents[2] / "SECURITY.md").read_text(encoding="utf-8")
    (line,) = [line for line in text.splitlines() if line.startswith("ACL SETUSER events-reader")]
    client.execute_command(*line.replace("READER_PASSWORD", "reader-pw").split())
    registry = CameraRegistry(client, "ferstream")
    registry.add(camera("door", url="rtsp://admin:hunter2@10.0.0.5/live"))
    client.xadd("ferstream:events:door", {"field": "value"})

    reader = redis.Redis.from_url(redis_server.url.replace("redis://", "redis://events-reader:reader-pw@"), socket_timeout=5)
    stream = "ferstream:events:door"
    # What a consumer in a group does (pipeline/events/readers.py): create the group, read, ack, claim, inspect.
    reader.xgroup_create(stream, "analytics", id="0", mkstream=True)
    ((_, entries),) = reader.xreadgroup("analytics", "worker-1", {stream: ">"}, count=10)
    assert reader.xack(stream, "analytics", entries[0][0]) == 1
    reader.xautoclaim(stream, "analytics", "worker-2", min_idle_time=0)
    assert reader.xinfo_groups(stream)[0]["name"] in (b"analytics", "analytics")
    assert reader.xlen(stream) == 1 and reader.xrange(stream)
    for forbidden in (
        lambda: reader.hgetall(registry.cameras_key),
        lambda: reader.get("ferstream:lease:door"),
        lambda: reader.xadd(stream, {"forged": "1"}),
        lambda: reader.delete(stream),
        lambda: reader.xtrim(stream, maxlen=0),
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            forbidden()
    reader.close()


# -- fencing: a worker that cannot renew stops decoding before its lease can expire --------------


def test_lease_fence_expires_a_margin_before_the_lease() -> None:
    fence = LeaseFence(lease_s=10.0, margin_s=3.0)
    fence.held("a", sent_at=100.0)
    fence.held("b", sent_at=102.0)
    assert fence.expired(106.9) == [] and fence.expired(107.0) == ["a"] and fence.expired(109.0) == ["a", "b"]
    fence.held("a", sent_at=99.0)  # a renewal that was sent earlier but answered later moves nothing back
    assert fence.remaining_s("a", 100.0) == 7.0
    fence.forget("a")
    assert fence.remaining_s("a", 100.0) is None and fence.expired(200.0) == ["b"]
    for margin in (0.0, 10.0, -1.0):
        with pytest.raises(ValueError, match="fence margin"):
            LeaseFence(lease_s=10.0, margin_s=margin)


class RecordingRegistry(CameraRegistry):
    """Remembers when each renewal that succeeded was sent: the lease lasts at least lease_s from then."""

    def __init__(self, client: redis.Redis, prefix: str, lease_s: float) -> None:
        super().__init__(client, prefix, lease_s)
        self.renewed_at: dict[str, float] = {}

    def renew_many(self, camera_ids: Iterable[str], owner: str) -> dict[str, bool]:
        sent_at = time.monotonic()
        renewed = super().renew_many(camera_ids, owner)
        self.renewed_at.update({camera_id: sent_at for camera_id, ok in renewed.items() if ok})
        return renewed

    def claim(self, camera_id: str, owner: str) -> bool:
        sent_at = time.monotonic()
        claimed = super().claim(camera_id, owner)
        if claimed:
            self.renewed_at[camera_id] = sent_at
        return claimed


class StopLog:
    """The stop callback of a fenced worker: when each camera stopped, and the lease's TTL left then
    (read through a client of its own, which fails while Redis is down: -3 then)."""

    def __init__(self, url: str, delay_s: float = 0.0) -> None:
        self.observer = redis.Redis.from_url(url, socket_timeout=0.5)
        self.delay_s = delay_s
        self.stopped_at: dict[str, float] = {}
        self.pttl_at_stop: dict[str, int] = {}

    def __call__(self, camera_id: str) -> None:
        time.sleep(self.delay_s)  # a decode thread takes a while to notice
        stopped_at = time.monotonic()
        try:
            self.pttl_at_stop[camera_id] = int(self.observer.pttl(lease_key(camera_id)))  # type: ignore[arg-type]
        except redis.RedisError:
            self.pttl_at_stop[camera_id] = -3
        self.stopped_at[camera_id] = stopped_at  # last: the tests wait for this one


def reconcile_forever(worker: ShardWorker, stop: threading.Event, interval_s: float) -> threading.Thread:
    """What IngestDeployment's reconciler does: reconcile every tick, and survive Redis errors."""

    def loop() -> None:
        while not stop.wait(interval_s):
            with contextlib.suppress(redis.RedisError):
                worker.reconcile(max_cameras=8)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread


@pytest.mark.integration
def test_a_worker_whose_renewals_stop_stops_its_cameras_before_the_lease_expires(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url, socket_timeout=2)
    registry = RecordingRegistry(client, PREFIX, lease_s=1.5)
    for camera_id in ("a", "b"):
        registry.add(camera(camera_id))
    stops = StopLog(redis_server.url, delay_s=0.05)
    worker = ShardWorker(registry, "w1", start=lambda camera: None, stop=stops, fence_margin_s=0.5)
    worker.reconcile(max_cameras=8)
    assert sorted(worker.running) == ["a", "b"]
    worker.start_fence(interval_s=0.05)
    # No more reconciles: the renewals pause (a reconciler stuck or starved).
    worker.wait_stopped(0)  # nothing stopping yet
    deadline = time.monotonic() + 5.0
    while len(stops.stopped_at) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sorted(stops.stopped_at) == ["a", "b"] and sorted(worker.fenced) == ["a", "b"]
    for camera_id in ("a", "b"):
        assert stops.stopped_at[camera_id] < registry.renewed_at[camera_id] + 1.5
        # Decoding stopped while the lease was still ours: no other worker could have claimed it yet.
        assert stops.pttl_at_stop[camera_id] > 0, stops.pttl_at_stop
    assert worker.wait_stopped(2.0) and worker.running == {}
    assert registry.owner("a") is None  # released once stopped, so another worker can take it at once
    worker.stop_fence()
    client.close()


@pytest.mark.integration
@pytest.mark.parametrize("outage", ["killed", "frozen"])
def test_a_worker_cut_off_from_redis_stops_its_cameras_before_the_lease_expires(redis_server: RedisServer, outage: str) -> None:
    # frozen: SIGSTOP, so every Redis call of the reconciler hangs for the socket timeout (longer than the
    # lease): the fence must not depend on those calls returning.
    client = redis.Redis.from_url(redis_server.url, socket_timeout=3, socket_connect_timeout=3)
    registry = RecordingRegistry(client, PREFIX, lease_s=1.5)
    for camera_id in ("a", "b", "c", "d"):
        registry.add(camera(camera_id))
    stops = StopLog(redis_server.url, delay_s=0.05)
    worker = ShardWorker(registry, "w1", start=lambda camera: None, stop=stops, fence_margin_s=0.5)
    halt = threading.Event()
    reconciler = reconcile_forever(worker, halt, interval_s=0.1)
    worker.start_fence(interval_s=0.05)
    deadline = time.monotonic() + 5.0
    while len(worker.running) < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sorted(worker.running) == ["a", "b", "c", "d"]
    time.sleep(0.3)  # a few renewals
    assert not stops.stopped_at

    pid = redis_server.pid
    assert pid is not None
    try:
        if outage == "killed":
            redis_server.stop()
        else:
            os.kill(pid, signal.SIGSTOP)
        cut_at = time.monotonic()
        deadline = time.monotonic() + 5.0
        while len(stops.stopped_at) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sorted(stops.stopped_at) == ["a", "b", "c", "d"], f"not stopped: {sorted(worker.running)}"
        for camera_id in ("a", "b", "c", "d"):
            # Before the lease can have expired on the server, and about (lease - margin) after the last renewal.
            assert stops.stopped_at[camera_id] < registry.renewed_at[camera_id] + 1.5
            assert stops.stopped_at[camera_id] - cut_at < 1.5
    finally:
        if outage == "frozen":
            os.kill(pid, signal.SIGCONT)
    halt.set()
    reconciler.join(5.0)
    worker.stop_fence()
    assert worker.wait_stopped(5.0)  # the releases time out (or fail) and the stop threads end
    client.close()


@pytest.mark.integration
def test_a_stolen_lease_stops_the_camera_at_the_next_renewal_and_stays_with_the_thief(redis_server: RedisServer) -> None:
    client = redis.Redis.from_url(redis_server.url, socket_timeout=2)
    registry = CameraRegistry(client, PREFIX, lease_s=5.0)
    registry.add(camera("a"))
    stops = StopLog(redis_server.url)
    worker = ShardWorker(registry, "w1", start=lambda camera: None, stop=stops)
    worker.reconcile(max_cameras=8)
    assert list(worker.running) == ["a"]
    client.set(lease_key("a"), "w2", px=5000)  # another worker's lease, e.g. after a clock jump or an operator's fix
    worker.reconcile(max_cameras=8)
    assert worker.running == {} and "a" in stops.stopped_at
    assert registry.owner("a") == "w2"  # stopping does not release the thief's lease
    worker.reconcile(max_cameras=8)
    assert worker.running == {}  # nor does the worker claim it back
    client.close()


@pytest.mark.integration
def test_a_camera_slow_to_stop_holds_up_neither_the_others_nor_the_reconcile(registry: CameraRegistry) -> None:
    for camera_id in ("fast", "slow"):
        registry.add(camera(camera_id))
    unblock = threading.Event()
    stopped: list[str] = []

    def stop(camera_id: str) -> None:
        if camera_id == "slow":
            unblock.wait(10.0)  # e.g. a decode thread blocked in network I/O
        stopped.append(camera_id)

    worker = ShardWorker(registry, "w1", start=lambda camera: None, stop=stop, stop_wait_s=0.3)
    worker.reconcile(max_cameras=8)
    registry.remove("fast")
    registry.remove("slow")
    started = time.monotonic()
    worker.reconcile(max_cameras=8)
    assert time.monotonic() - started < 1.0
    assert stopped == ["fast"] and registry.owner("fast") is None
    assert worker.stopping == ["slow"] and registry.owner("slow") == "w1"  # its lease is kept while it decodes
    registry.add(camera("slow"))  # added back meanwhile: not started twice on this worker
    worker.reconcile(max_cameras=8)
    assert worker.running == {} and worker.stopping == ["slow"]
    unblock.set()
    assert worker.wait_stopped(5.0)
    assert registry.owner("slow") is None
    worker.reconcile(max_cameras=8)
    assert list(worker.running) == ["slow"]


@pytest.mark.integration
def test_shutdown_stops_all_cameras_at_once_and_keeps_the_lease_of_one_that_did_not_stop(registry: CameraRegistry) -> None:
    ids = ["a", "b", "c", "stuck"]
    for camera_id in ids:
        registry.add(camera(camera_id))
    unblock = threading.Event()

    def stop(camera_id: str) -> None:
        time.sleep(0.3)
        if camera_id == "stuck":
            unblock.wait(10.0)

    worker = ShardWorker(registry, "w1", start=lambda camera: None, stop=stop)
    worker.reconcile(max_cameras=8)
    started = time.monotonic()
    assert worker.stop_all(timeout_s=1.0) == ["stuck"]
    assert time.monotonic() - started < 1.5  # bounded by timeout_s, whatever the stuck camera does
    assert set(owners(registry, ids).values()) == {"w1"}  # stop_all keeps the leases (the flush comes first)
    assert worker.release_all() == ["a", "b", "c"]
    assert owners(registry, ids) == {"a": None, "b": None, "c": None, "stuck": "w1"}
    unblock.set()
    assert worker.wait_stopped(5.0)
