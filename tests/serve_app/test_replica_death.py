"""Replica death under Serve (issue 11's fault-injection suite): an Ingest replica's actor is killed
with ``ray.kill`` while it decodes cameras. Its cameras must resume on another replica within the
lease time + 5 s, and no camera may ever be decoded by two replicas at once.

Real parts: a local Ray cluster, the app started with ``serve run`` (two Ingest replicas), its own
redis-server and file cameras looping the shared clips in real time."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from pipeline.events import ExpressionEvent, stream_key
from pipeline.registry import CameraRegistry
from serve_app.deployments import LEASE_S
from tests.conftest import RedisServer
from tests.serve_app.serving import Service, running_service

pytestmark = pytest.mark.integration

RESUME_SLACK_S = 5.0  # the bound: cameras resume within the lease + 5 s
CAMERAS = ("door", "desk", "hall")
# Two people in nearly every frame: every camera makes events all the time (the other shared clip has
# stretches without anyone, in which a resumed or buffering camera would make none).
CLIP = "head-pose-face-detection-female-and-male"
PREFIX = "ferstream"  # the shipped pipeline config's stream_prefix

# The Ingest replicas' actors: name and pid (the registry's worker id is hostname:pid:suffix). The
# state API is given this cluster's address: with another cluster on the machine it refuses to guess.
INGEST_ACTORS = """
from ray.util.state import list_actors
ingest = [("state", "=", "ALIVE"), ("class_name", "=", "ServeReplica:ferstream:Ingest")]
alive = list_actors(address={address!r}, filters=ingest, detail=True, limit=100)
print(json.dumps([[actor.name, actor.pid] for actor in alive]))
"""
KILL_ACTOR = """
import time
actor = ray.get_actor({name!r}, namespace="serve")
killed_at = time.time()
ray.kill(actor)
print(json.dumps(killed_at))
"""


@dataclass
class LeaseSamples:
    """Every camera's lease owner, read every ``interval_s`` in a thread. Each sample is stamped with
    the time *before* its read: a claim that the read did not see happened after that time."""

    registry: CameraRegistry
    camera_ids: tuple[str, ...]
    interval_s: float = 0.1
    samples: list[tuple[float, dict[str, str | None]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LeaseSamples:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            sampled_at = time.time()
            self.samples.append((sampled_at, self.registry.owners(self.camera_ids)))

    def owners_of(self, camera_id: str) -> list[tuple[float, str | None]]:
        return [(at, owners[camera_id]) for at, owners in self.samples]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("replica-death")


@pytest.fixture(scope="module")
def redis_server(work: Path) -> Iterator[RedisServer]:
    server = RedisServer(work)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def service(work: Path, redis_server: RedisServer, shared_clips: dict[str, Path]) -> Iterator[Service]:
    media = shared_clips[CLIP].resolve().parent
    with running_service(
        work,
        "serve-cpu.yaml",
        redis_server.url,
        pipeline_overrides={"url_policy": {"allowed_file_dirs": [str(media)]}},
        deployment_overrides={"Ingest": {"num_replicas": 2}},
    ) as running:
        yield running


def registry_of(service: Service) -> CameraRegistry:
    return CameraRegistry(redis.Redis.from_url(service.redis_url), PREFIX, LEASE_S)


def runs_of(events: list[ExpressionEvent]) -> dict[str, list[float]]:
    """run_id -> the capture times of its events."""
    runs: dict[str, list[float]] = defaultdict(list)
    for event in events:
        assert event.run_id is not None
        runs[event.run_id].append(event.capture_time)
    return runs


def pid_of(worker_id: str) -> int:
    return int(worker_id.split(":")[1])  # serve_app.deployments: f"{hostname}:{pid}:{suffix}"


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_a_killed_ingest_replicas_cameras_resume_on_another_replica_and_are_never_decoded_twice(
    service: Service, shared_clips: dict[str, Path]
) -> None:
    registry = registry_of(service)
    # Both replicas announce themselves before any camera exists, so the cameras are shared out.
    service.wait_until(lambda: registry.client.zcard(registry.workers_key) >= 2, 120, "both Ingest replicas in the workers set")
    clip = shared_clips[CLIP].resolve()
    # Files are paced like live cameras (SourceConfig.realtime, on by default; the API does not take it).
    for camera_id in CAMERAS:
        body = {"camera_id": camera_id, "url": clip.as_uri(), "loop": True, "target_fps": 2}
        response = service.post_stream(body)
        assert response.status_code == 201, response.text
    service.wait_until(
        lambda: (
            all(service.event_count(camera_id) >= 3 for camera_id in CAMERAS) and len(set(registry.owners(CAMERAS).values()) - {None}) == 2
        ),
        180,
        "events from every camera, decoded on two replicas",
    )
    owners = registry.owners(CAMERAS)
    victim = Counter(owners.values()).most_common(1)[0][0]
    assert victim is not None
    moved = sorted(camera_id for camera_id, owner in owners.items() if owner == victim)
    kept = sorted(set(CAMERAS) - set(moved))
    survivor = owners[kept[0]]
    runs_before = {camera_id: set(runs_of(service.events(camera_id))) for camera_id in CAMERAS}
    actors = {pid: name for name, pid in service.ray_driver(INGEST_ACTORS.format(address=service.ray_address))}
    victim_pid = pid_of(victim)
    assert victim_pid in actors, f"no Ingest actor with the pid of {victim}: {actors}"

    with LeaseSamples(registry, CAMERAS) as leases:
        killed_at = float(service.ray_driver(KILL_ACTOR.format(name=actors[victim_pid])))
        dead_at = service.wait_until(lambda: process_gone(victim_pid) and time.time(), 30, "the killed replica's process to exit")

        def resumed() -> bool:
            return all(set(runs_of(service.events(camera_id))) - runs_before[camera_id] for camera_id in moved)

        service.wait_until(resumed, LEASE_S + RESUME_SLACK_S + 30, "the killed replica's cameras to resume elsewhere")

        def streaming_elsewhere() -> dict[str, dict[str, object]] | None:
            listed = service.streams()
            ok = all(listed[c]["state"] == "streaming" and listed[c]["owner"] not in (None, victim) for c in moved)
            return listed if ok else None

        streams = service.wait_until(
            streaming_elsewhere,
            30,
            "GET /streams to show the moved cameras streaming on another worker",
        )
        time.sleep(1.0)  # a few more samples of the new owners

    resume_s = {}
    for camera_id in moved:
        runs = runs_of(service.events(camera_id))
        new_runs = set(runs) - runs_before[camera_id]
        first_new = min(min(runs[run_id]) for run_id in new_runs)
        resume_s[camera_id] = first_new - killed_at
        assert resume_s[camera_id] <= LEASE_S + RESUME_SLACK_S, f"{camera_id} resumed {resume_s[camera_id]:.1f}s after the kill"

        # Never decoded twice, from the leases: a worker decodes a camera only after its claim
        # (SET NX) succeeded, and the sample just before the new owner's first sample still saw the
        # victim's lease or none, so the claim came after that sample's time. When that time is
        # after the victim's process had exited, the new decoding began after the old one ended.
        history = leases.owners_of(camera_id)
        first_other = next(i for i, (_at, owner) in enumerate(history) if owner not in (None, victim))
        assert first_other > 0, f"{camera_id}: taken over before the first sample"
        seen_at, seen_owner = history[first_other - 1]
        assert seen_owner in (None, victim), history[first_other - 1]
        assert seen_at >= dead_at, f"{camera_id}: claimed by {history[first_other][1]} before the killed replica had exited"
        assert all(owner in (None, victim) for _at, owner in history[:first_other])

        # The same from the events, which every decoding session stamps with its own run_id: ordered
        # by their first capture, each run's events all precede the next run's (capture times are
        # wall-clock on this one machine), and the killed replica's end before its process exited.
        ordered = sorted(runs.values(), key=min)
        for earlier, later in zip(ordered, ordered[1:], strict=False):
            assert max(earlier) < min(later), f"{camera_id}: the events of two runs interleave"
        assert all(max(runs[run_id]) <= dead_at for run_id in runs_before[camera_id])
        assert streams[camera_id]["owner"] == history[-1][1]

    # The survivor's cameras were not disturbed: same owner in every sample, one run throughout.
    for camera_id in kept:
        assert {owner for _at, owner in leases.owners_of(camera_id)} == {survivor}
        assert set(runs_of(service.events(camera_id))) == runs_before[camera_id]
    lease_gone_s = {
        camera_id: next(at for at, owner in leases.owners_of(camera_id) if owner is None) - killed_at
        for camera_id in moved
        if any(owner is None for _at, owner in leases.owners_of(camera_id))
    }
    new_owners = {camera_id: "survivor" if streams[camera_id]["owner"] == survivor else "replacement" for camera_id in moved}
    print(
        f"replica-death: moved={moved} kept={kept} process exit {dead_at - killed_at:.2f}s after the kill; "
        f"lease seen free after {lease_gone_s}; first event of the new run after {resume_s}; new owner {new_owners}"
    )


DELETE_APP = "serve.delete('ferstream'); print(json.dumps(True))"
PAUSE_S = 8.0  # Redis frozen this long: longer than a Serve delete takes to reach the replicas' shutdown


def test_events_buffered_while_redis_is_frozen_reach_the_stream_when_the_app_is_deleted(
    service: Service, redis_server: RedisServer
) -> None:
    # After the replica-death test: the cameras run on the surviving (and maybe the replacement) replica.
    registry = registry_of(service)
    running = sorted(camera_id for camera_id, owner in registry.owners(CAMERAS).items() if owner is not None)
    assert running, "no camera is running"
    assert redis_server.pid is not None
    os.kill(redis_server.pid, signal.SIGSTOP)  # every Redis call hangs: events go to the outage buffer
    paused_at = time.time()
    # The delete starts during the outage, so the Ingest's shutdown (stop, flush, release) begins
    # while the buffer still holds the outage's events.
    delete = service.ray_driver_in_background(DELETE_APP)
    try:
        time.sleep(PAUSE_S)
    finally:
        os.kill(redis_server.pid, signal.SIGCONT)
    resumed_at = time.time()
    assert delete.wait(timeout=120) == 0, delete.stderr.read() if delete.stderr else ""

    client = redis.Redis.from_url(service.redis_url)
    for camera_id in running:
        entries = client.xrange(stream_key(PREFIX, camera_id))
        events = [ExpressionEvent.from_fields(fields) for _id, fields in entries]
        keys = [(event.run_id, event.frame_index, event.track_id) for event in events]
        # Duplicates are allowed here, unlike after a Redis restart: a write that timed out against the
        # frozen server still sits in its socket and runs on SIGCONT, and the publisher then retries
        # it (at-least-once, pipeline/events/publisher.py). Consumers de-duplicate on this key.
        duplicates = len(keys) - len(set(keys))
        # Captured while Redis was frozen, so buffered: the shutdown's flush (or a retry before it) delivered them.
        during = [event for event in events if paused_at < event.capture_time < resumed_at]
        assert during, f"{camera_id}: no event captured during the outage is in the stream"
        print(f"replica-flush: {camera_id}: {len(during)} events of the {PAUSE_S:g}s outage in the stream; {duplicates} duplicates")
