"""The camera registry: desired state (cameras), leases (claim/renew/release/expiry) and observed
state (statuses) against a real redis-server (the ``redis_server`` fixture; those tests are marked
integration), and ``plan_reconcile`` by hand.

Leases are exercised with real TTLs: expiry uses a 0.2 s lease and polls for the key to go away
rather than sleeping a fixed time; renewals are checked through PTTL, not by racing the clock.
"""

from __future__ import annotations

import itertools
import logging

import pytest
import redis

from pipeline.frames import SourceStatus, StreamState
from pipeline.registry import AddOutcome, CameraRegistry, ReconcilePlan, plan_reconcile, status_to_dict
from tests.pipeline.registry_support import PREFIX, camera, lease_key, wait_until_gone

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
