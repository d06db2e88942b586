"""The camera registry: which cameras should run, who runs each one, and how each is doing.

It lives in the same Redis as the events, so it survives restarts of the service and any
number of ingest workers can share it:

- ``<prefix>:cameras`` — a hash, camera id → the camera's validated ``SourceConfig`` as JSON;
- ``<prefix>:lease:<camera_id>`` — the id of the worker decoding that camera, with a TTL the
  owner keeps renewing. A worker that dies stops renewing, the lease expires, and another
  worker claims the camera: the same pattern as a consumer group rebalancing partitions.
- ``<prefix>:status:<camera_id>`` — the owner's latest ``SourceStatus`` as JSON, with a TTL.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import redis

from pipeline.config import ConfigError, SourceConfig, parse_config
from pipeline.frames import SourceStatus
from pipeline.log_limits import RepeatLimitedLog

log = logging.getLogger("ferstream.registry")

# Renew only a lease we still hold: compare-and-expire must be atomic, or a worker could extend
# a lease another worker took over after ours expired.
_RENEW = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end"
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end"
# Add a camera unless its id exists or the registry is full, in one step: two API calls racing for
# the last free place cannot both get it.
_ADD_WITHIN = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 0 end
if redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[3]) then return -1 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""


class AddOutcome(enum.Enum):
    ADDED = 1
    EXISTS = 0
    FULL = -1


def status_to_dict(status: SourceStatus, owner: str) -> dict[str, Any]:
    data = dataclasses.asdict(status)
    data["state"] = status.state.value
    data["owner"] = owner
    return data


@dataclass(frozen=True)
class ReconcilePlan:
    stop: list[str]  # owned cameras that were removed or whose lease was lost
    claim: list[str]  # unowned cameras to try to claim, within capacity


def plan_reconcile(
    desired: Iterable[str], running: Iterable[str], lost: Iterable[str], capacity: int, unowned: Iterable[str] | None = None
) -> ReconcilePlan:
    """What one worker should do: stop what is no longer its job, then claim up to its capacity.

    ``unowned``: the desired cameras nobody holds a lease on (None: assume all are free). Claiming
    only those keeps a full worker from retrying cameras another worker runs, forever, while the
    cameras past them wait.
    """
    desired_set, running_set, lost_set = set(desired), set(running), set(lost)
    stop = sorted((running_set - desired_set) | (running_set & lost_set))
    keep = running_set - set(stop)
    free = max(0, capacity - len(keep))
    candidates = desired_set - running_set if unowned is None else (desired_set & set(unowned)) - running_set
    claim = sorted(candidates)[:free]
    return ReconcilePlan(stop=stop, claim=claim)


class CameraRegistry:
    def __init__(self, client: redis.Redis, prefix: str, lease_s: float = 10.0) -> None:
        self.client = client
        self.prefix = prefix
        self.lease_ms = int(lease_s * 1000)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._add_within = client.register_script(_ADD_WITHIN)

    @property
    def cameras_key(self) -> str:
        return f"{self.prefix}:cameras"

    @property
    def seeded_key(self) -> str:
        return f"{self.prefix}:cameras:seeded"

    @property
    def workers_key(self) -> str:
        return f"{self.prefix}:workers"

    def _lease_key(self, camera_id: str) -> str:
        return f"{self.prefix}:lease:{camera_id}"

    def _status_key(self, camera_id: str) -> str:
        return f"{self.prefix}:status:{camera_id}"

    # -- desired state (the API writes it) ------------------------------------------------
    def add(self, camera: SourceConfig) -> bool:
        """False when a camera with this id is already registered."""
        return bool(self.client.hsetnx(self.cameras_key, camera.camera_id, camera.model_dump_json()))

    def add_within(self, camera: SourceConfig, max_cameras: int) -> AddOutcome:
        """Add ``camera`` unless its id is registered or ``max_cameras`` cameras already are."""
        outcome = self._add_within(keys=[self.cameras_key], args=[camera.camera_id, camera.model_dump_json(), max_cameras])
        return AddOutcome(int(outcome))

    def count(self) -> int:
        return int(self.client.hlen(self.cameras_key))

    def remove(self, camera_id: str) -> bool:
        pipe = self.client.pipeline(transaction=True)
        pipe.hdel(self.cameras_key, camera_id)
        pipe.delete(self._status_key(camera_id))
        removed, _ = pipe.execute()
        return bool(removed)

    def cameras(self) -> dict[str, SourceConfig]:
        cameras = {}
        for raw_id, raw in self.client.hgetall(self.cameras_key).items():
            camera_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            try:
                cameras[camera_id] = parse_config(SourceConfig, json.loads(raw), f"{self.cameras_key}[{camera_id}]")
            except (ConfigError, ValueError) as error:
                # Written by another version, or by hand: skip it loudly rather than stop every camera.
                log.error("registry: ignoring camera %s: %s", camera_id, error)
        return cameras

    # -- leases (the ingest workers hold them) ----------------------------------------------
    def claim(self, camera_id: str, owner: str) -> bool:
        return bool(self.client.set(self._lease_key(camera_id), owner, nx=True, px=self.lease_ms))

    def renew(self, camera_id: str, owner: str) -> bool:
        return bool(self._renew(keys=[self._lease_key(camera_id)], args=[owner, self.lease_ms]))

    def release(self, camera_id: str, owner: str) -> None:
        self._release(keys=[self._lease_key(camera_id)], args=[owner])

    def owner(self, camera_id: str) -> str | None:
        return self.owners([camera_id])[camera_id]

    def owners(self, camera_ids: Iterable[str]) -> dict[str, str | None]:
        ids = list(camera_ids)
        values = self.client.mget([self._lease_key(camera_id) for camera_id in ids]) if ids else []
        return {camera_id: value.decode() if isinstance(value, bytes) else value for camera_id, value in zip(ids, values, strict=True)}

    def heartbeat(self, worker_id: str) -> int:
        """Record that ``worker_id`` is alive; returns how many workers are (seen within a lease)."""
        now = time.time()
        pipe = self.client.pipeline(transaction=True)
        pipe.zadd(self.workers_key, {worker_id: now})
        pipe.zremrangebyscore(self.workers_key, "-inf", now - self.lease_ms / 1000)
        pipe.zcard(self.workers_key)
        return int(pipe.execute()[-1])

    def leave(self, worker_id: str) -> None:
        self.client.zrem(self.workers_key, worker_id)

    def seed(self, cameras: Iterable[SourceConfig]) -> list[str]:
        """Register start-up cameras once: a camera seeded before (and maybe deleted through the
        API since) is not brought back when the service restarts. Returns the ids added."""
        added = []
        for camera in cameras:
            if self.client.sadd(self.seeded_key, camera.camera_id) and self.add(camera):
                added.append(camera.camera_id)
        return added

    # -- observed state ---------------------------------------------------------------------
    def put_statuses(self, statuses: Iterable[dict[str, Any]], ttl_s: float) -> None:
        pipe = self.client.pipeline(transaction=False)
        for status in statuses:
            pipe.set(self._status_key(status["camera_id"]), json.dumps(status), px=int(ttl_s * 1000))
        pipe.execute()

    def statuses(self, camera_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        ids = list(camera_ids)
        if not ids:
            return {}
        raw = self.client.mget([self._status_key(camera_id) for camera_id in ids])
        statuses = {}
        for camera_id, value in zip(ids, raw, strict=True):
            if value is None:
                continue
            try:
                statuses[camera_id] = json.loads(value)
            except ValueError:
                log.error("registry: ignoring an unreadable status of camera %s", camera_id)
        return statuses


class ShardWorker:
    """One ingest worker's side of the registry: each ``reconcile`` renews its leases, stops the
    cameras it lost or that were removed or changed, and claims free cameras up to a fair share
    (``ceil(cameras / live workers)``, at most ``max_cameras``), so that replicas started together
    split the cameras. Cameras are not moved from a busy worker to a newer one; they move when a
    worker dies or its cameras are removed."""

    def __init__(
        self,
        registry: CameraRegistry,
        worker_id: str,
        start: Callable[[SourceConfig], None],
        stop: Callable[[str], None],
    ) -> None:
        self.registry = registry
        self.worker_id = worker_id
        self._start = start
        self._stop = stop
        self.running: dict[str, SourceConfig] = {}
        # A camera that cannot start is retried every tick: log it once per interval, with a count.
        self._start_errors = RepeatLimitedLog(log)

    def reconcile(self, max_cameras: int) -> ReconcilePlan:
        desired = self.registry.cameras()
        workers = self.registry.heartbeat(self.worker_id)
        lost = [camera_id for camera_id in sorted(self.running) if not self.registry.renew(camera_id, self.worker_id)]
        changed = [camera_id for camera_id, camera in self.running.items() if camera_id in desired and desired[camera_id] != camera]
        free = [camera_id for camera_id, owner in self.registry.owners(sorted(set(desired) - set(self.running))).items() if owner is None]
        share = min(max_cameras, math.ceil(len(desired) / max(1, workers)))
        plan = plan_reconcile(desired, self.running, [*lost, *changed], share, unowned=free)
        for camera_id in plan.stop:
            self.running.pop(camera_id)
            self._stop(camera_id)
            self.registry.release(camera_id, self.worker_id)
        for camera_id in plan.claim:
            if not self.registry.claim(camera_id, self.worker_id):
                continue  # another worker was faster
            try:
                self._start(desired[camera_id])
            except Exception as error:
                # Let another worker (or the next tick) try rather than hold a lease on nothing.
                self._start_errors.error(
                    (camera_id, type(error).__name__), "worker %s: could not start camera %s", self.worker_id, camera_id, exc_info=error
                )
                self.registry.release(camera_id, self.worker_id)
                continue
            self.running[camera_id] = desired[camera_id]
        return plan

    def shutdown(self) -> None:
        for camera_id in sorted(self.running):
            self._stop(camera_id)
            self.registry.release(camera_id, self.worker_id)
        self.running.clear()
        self.registry.leave(self.worker_id)
