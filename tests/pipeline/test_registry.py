"""The camera registry: desired state (cameras), leases (claim/renew/release/expiry) and observed
state (statuses) against a real redis-server (the ``redis_server`` fixture; those tests are marked
integration), and ``plan_reconcile`` by hand.

Leases are exercised with real TTLs: expiry uses a 0.2 s lease and polls for the key to go away
rather than sleeping a fixed time; renewals are checked through PTTL, not by racing the clock.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
import redis

from pipeline.config import SourceConfig
from pipeline.frames import SourceStatus, StreamState
from pipeline.registry import AddOutcome, CameraRegistry, LeaseFence, ReconcilePlan, ShardWorker, plan_reconcile, status_to_dict
from tests.conftest import RedisServer

PREFIX = "test"


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url, socket_timeout=5)
    yield client
    client.close()


@pytest.fixture
def registry(client: redis.Redis) -> CameraRegistry:
    return CameraRegistry(client, PREFIX, lease_s=5.0)


def camera(camera_id: str, url: str = "rtsp://cam.local/stream", **fields: object) -> SourceConfig:
    return SourceConfig.model_validate({"camera_id": camera_id, "url": url, **fields})


def lease_key(camera_id: str, prefix: str = PREFIX) -> str:
    return f"{prefix}:lease:{camera_id}"


def wait_until_gone(client: redis.Redis, key: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while client.exists(key):
        assert time.monotonic() < deadline, f"{key} did not expire within {timeout_s}s"
        time.sleep(0.02)


# -- desired state ------------------------------------------------------------------------------


@pytest.mark.integration
def test_add_remove_and_cameras_round_trip(registry: CameraRegistry, client: redis.Redis) -> None:
    lobby = camera("lobby", target_fps=2.5, transport="udp", reconnect={"initial_s": 0.1, "max_s": 1.0})
    door = camera("door", url="/videos/door.mp4", loop=True, target_fps=None)
    assert registry.cameras() == {}

    assert registry.add(lobby) is True
    assert registry.add(door) is True
    assert registry.cameras() == {"lobby": lobby, "door": door}
    assert client.hlen(f"{PREFIX}:cameras") == 2

    # HSETNX: a duplicate id is refused and the stored camera is left as it was.
    assert registry.add(camera("lobby", url="rtsp://elsewhere/other")) is False
    assert registry.cameras()["lobby"] == lobby

    assert registry.remove("lobby") is True
    assert registry.remove("lobby") is False
    assert registry.remove("never-added") is False
    assert registry.cameras() == {"door": door}


@pytest.mark.integration
def test_add_within_stops_at_max_cameras_and_reports_existing_ids(registry: CameraRegistry) -> None:
    assert registry.add_within(camera("a"), max_cameras=2) is AddOutcome.ADDED
    assert registry.add_within(camera("a", url="rtsp://other/x"), max_cameras=2) is AddOutcome.EXISTS
    assert registry.add_within(camera("b"), max_cameras=2) is AddOutcome.ADDED
    assert registry.add_within(camera("c"), max_cameras=2) is AddOutcome.FULL
    assert registry.add_within(camera("a"), max_cameras=2) is AddOutcome.EXISTS  # an existing id wins over full
    assert sorted(registry.cameras()) == ["a", "b"] and registry.count() == 2
    assert registry.cameras()["a"] == camera("a")
    registry.remove("a")
    assert registry.add_within(camera("c"), max_cameras=2) is AddOutcome.ADDED


def test_remove_also_deletes_the_status(registry: CameraRegistry, client: redis.Redis) -> None:
    registry.add(camera("lobby"))
    registry.put_statuses([{"camera_id": "lobby", "state": "streaming"}], ttl_s=60)
    assert registry.remove("lobby")
    assert registry.statuses(["lobby"]) == {}
    assert not client.exists(f"{PREFIX}:status:lobby")


@pytest.mark.integration
def test_prefixes_keep_registries_apart(client: redis.Redis) -> None:
    first, second = CameraRegistry(client, "one"), CameraRegistry(client, "two")
    assert first.add(camera("lobby"))
    assert second.add(camera("lobby", url="rtsp://other/stream"))  # same id, other prefix: no clash
    assert first.cameras()["lobby"].url == "rtsp://cam.local/stream"
    assert second.cameras()["lobby"].url == "rtsp://other/stream"
    assert first.claim("lobby", "w1") and second.claim("lobby", "w2")


@pytest.mark.integration
def test_corrupt_stored_cameras_are_skipped_with_a_log_line(
    registry: CameraRegistry, client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    good = camera("good")
    registry.add(good)
    key = registry.cameras_key
    client.hset(key, "not-json", "{this is not json")
    client.hset(key, "bad-scheme", '{"camera_id": "bad-scheme", "url": "ftp://host/video"}')
    client.hset(key, "unknown-field", '{"camera_id": "unknown-field", "url": "rtsp://h/s", "colour": "red"}')
    client.hset(key, "not-an-object", "[1, 2, 3]")
    client.hset(key, "bad-utf8", b"\xff\xfe{")

    with caplog.at_level(logging.ERROR, logger="ferstream.registry"):
        cameras = registry.cameras()

    assert cameras == {"good": good}
    messages = [record.getMessage() for record in caplog.records if record.name == "ferstream.registry"]
    for camera_id in ("not-json", "bad-scheme", "unknown-field", "not-an-object", "bad-utf8"):
        assert any(f"ignoring camera {camera_id}:" in message for message in messages), (camera_id, messages)
    assert any("unsupported URL scheme" in message for message in messages)
    assert any("colour" in message for message in messages)
    assert all(record.levelno == logging.ERROR for record in caplog.records if record.name == "ferstream.registry")


# -- leases -------------------------------------------------------------------------------------


@pytest.mark.integration
def test_only_one_owner_can_claim_a_camera(registry: CameraRegistry) -> None:
    assert registry.owner("lobby") is None
    assert registry.claim("lobby", "worker-a") is True
    assert registry.owner("lobby") == "worker-a"
    assert registry.claim("lobby", "worker-b") is False
    assert registry.claim("lobby", "worker-a") is False  # NX: even the owner does not re-claim, it renews
    assert registry.owner("lobby") == "worker-a"


@pytest.mark.integration
def test_claim_sets_the_lease_ttl(registry: CameraRegistry, client: redis.Redis) -> None:
    assert registry.lease_ms == 5000
    registry.claim("lobby", "worker-a")
    assert 4000 < client.pttl(lease_key("lobby")) <= 5000


@pytest.mark.integration
def test_renew_extends_only_the_owners_lease(registry: CameraRegistry, client: redis.Redis) -> None:
    registry.claim("lobby", "worker-a")
    client.pexpire(lease_key("lobby"), 1000)  # as if most of the lease had gone by

    assert registry.renew("lobby", "worker-b") is False
    assert client.pttl(lease_key("lobby")) <= 1000, "a non-owner's renew must not extend the lease"
    assert registry.owner("lobby") == "worker-a"

    assert registry.renew("lobby", "worker-a") is True
    assert client.pttl(lease_key("lobby")) > 4000
    assert registry.owner("lobby") == "worker-a"


@pytest.mark.integration
def test_renew_does_not_resurrect_a_missing_lease(registry: CameraRegistry) -> None:
    assert registry.renew("lobby", "worker-a") is False
    assert registry.owner("lobby") is None


@pytest.mark.integration
def test_release_frees_only_the_owners_lease(registry: CameraRegistry) -> None:
    registry.claim("lobby", "worker-a")
    registry.release("lobby", "worker-b")
    assert registry.owner("lobby") == "worker-a", "a non-owner's release must not delete the lease"

    registry.release("lobby", "worker-a")
    assert registry.owner("lobby") is None
    assert registry.claim("lobby", "worker-b") is True
    registry.release("lobby", "worker-a")  # the old owner releasing late must not free it again
    assert registry.owner("lobby") == "worker-b"
    registry.release("nothing", "worker-a")  # releasing what nobody holds is a no-op


@pytest.mark.integration
def test_an_expired_lease_can_be_claimed_by_another_worker(client: redis.Redis) -> None:
    registry = CameraRegistry(client, PREFIX, lease_s=0.2)
    assert registry.lease_ms == 200
    assert registry.claim("lobby", "worker-a")
    assert not registry.claim("lobby", "worker-b")

    wait_until_gone(client, lease_key("lobby"))  # worker-a stopped renewing

    assert registry.owner("lobby") is None
    assert registry.claim("lobby", "worker-b") is True
    # worker-a comes back: it can neither renew nor release worker-b's lease.
    assert registry.renew("lobby", "worker-a") is False
    registry.release("lobby", "worker-a")
    assert registry.owner("lobby") == "worker-b"


# -- observed state -----------------------------------------------------------------------------


def source_status(camera_id: str, state: StreamState = StreamState.STREAMING) -> SourceStatus:
    return SourceStatus(
        camera_id=camera_id,
        url=f"rtsp://cam.local/{camera_id}",
        state=state,
        measured_fps=4.9,
        decoded_fps=25.0,
        last_frame_time=1_700_000_000.5,
        reconnects=2,
        frames_decoded=1000,
        frames_dropped=800,
        last_error=None,
    )


def test_status_to_dict_is_json_ready_and_names_the_owner() -> None:
    data = status_to_dict(source_status("lobby", StreamState.RECONNECTING), "worker-a")
    assert data["state"] == "reconnecting" and type(data["state"]) is str
    assert data["owner"] == "worker-a"
    assert data["camera_id"] == "lobby" and data["reconnects"] == 2 and data["last_error"] is None


@pytest.mark.integration
def test_statuses_round_trip(registry: CameraRegistry, client: redis.Redis) -> None:
    statuses = [status_to_dict(source_status("lobby"), "worker-a"), status_to_dict(source_status("door", StreamState.FAILED), "worker-b")]
    registry.put_statuses(statuses, ttl_s=30)

    assert registry.statuses(["lobby", "door", "missing"]) == {"lobby": statuses[0], "door": statuses[1]}
    assert registry.statuses(iter(["door"])) == {"door": statuses[1]}
    assert registry.statuses([]) == {}
    assert 25_000 < client.pttl(f"{PREFIX}:status:lobby") <= 30_000

    registry.put_statuses([], ttl_s=30)  # nothing to write is fine
    updated = {**statuses[0], "state": "reconnecting"}
    registry.put_statuses([updated], ttl_s=30)
    assert registry.statuses(["lobby"])["lobby"]["state"] == "reconnecting"


@pytest.mark.integration
def test_statuses_expire_with_their_ttl(registry: CameraRegistry, client: redis.Redis) -> None:
    registry.put_statuses([status_to_dict(source_status("lobby"), "worker-a")], ttl_s=0.2)
    assert 0 < client.pttl(f"{PREFIX}:status:lobby") <= 200
    wait_until_gone(client, f"{PREFIX}:status:lobby")
    assert registry.statuses(["lobby"]) == {}


# -- plan_reconcile -----------------------------------------------------------------------------


def test_plan_stops_removed_cameras() -> None:
    assert plan_reconcile(desired=["a"], running=["a", "b"], lost=[], capacity=10) == ReconcilePlan(stop=["b"], claim=[])


def test_plan_stops_lost_cameras_and_does_not_reclaim_them_in_the_same_round() -> None:
    plan = plan_reconcile(desired=["a", "b"], running=["a", "b"], lost=["a"], capacity=10)
    assert plan == ReconcilePlan(stop=["a"], claim=[])


def test_plan_ignores_lost_cameras_it_does_not_run() -> None:
    assert plan_reconcile(desired=["a"], running=[], lost=["a", "z"], capacity=10) == ReconcilePlan(stop=[], claim=["a"])


def test_plan_claims_within_capacity() -> None:
    assert plan_reconcile(desired="edcba", running=[], lost=[], capacity=3).claim == ["a", "b", "c"]
    # Running cameras count against the capacity...
    assert plan_reconcile(desired="abcd", running="ab", lost=[], capacity=3) == ReconcilePlan(stop=[], claim=["c"])
    assert plan_reconcile(desired="abcd", running="abc", lost=[], capacity=3) == ReconcilePlan(stop=[], claim=[])
    # ...but the ones being stopped free their slots in the same round.
    assert plan_reconcile(desired="bcd", running="ab", lost="b", capacity=2) == ReconcilePlan(stop=["a", "b"], claim=["c", "d"])
    assert plan_reconcile(desired="ab", running=[], lost=[], capacity=0).claim == []


def test_plan_over_capacity_claims_nothing_and_sheds_nothing() -> None:
    # After max_cameras is lowered, a worker keeps what it runs (it only stops claiming).
    assert plan_reconcile(desired="abc", running="abc", lost=[], capacity=1) == ReconcilePlan(stop=[], claim=[])


def test_plan_is_deterministic_whatever_the_input_order() -> None:
    desired, running, lost = ["d", "a", "e", "c", "b"], ["z", "c", "y", "a"], ["a"]
    expected = ReconcilePlan(stop=["a", "y", "z"], claim=["b", "d"])
    for order in itertools.permutations(desired):
        assert plan_reconcile(iter(order), reversed(running), set(lost), capacity=3) == expected


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
