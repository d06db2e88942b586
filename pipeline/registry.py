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
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis

from pipeline.config import ConfigError, SourceConfig, parse_config
from pipeline.sources import SourceStatus

log = logging.getLogger("ferstream.registry")

# Renew only a lease we still hold: compare-and-expire must be atomic, or a worker could extend
# a lease another worker took over after ours expired.
_RENEW = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end"
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end"


def status_to_dict(status: SourceStatus, owner: str) -> dict[str, Any]:
    data = dataclasses.asdict(status)
    data["state"] = status.state.value
    data["owner"] = owner
    return data


@dataclass(frozen=True)
class ReconcilePlan:
    stop: list[str]  # owned cameras that were removed or whose lease was lost
    claim: list[str]  # unowned cameras to try to claim, within capacity


def plan_reconcile(desired: Iterable[str], running: Iterable[str], lost: Iterable[str], capacity: int) -> ReconcilePlan:
    """What one worker should do: stop what is no longer its job, then claim up to its capacity."""
    desired_set, running_set, lost_set = set(desired), set(running), set(lost)
    stop = sorted((running_set - desired_set) | (running_set & lost_set))
    keep = running_set - set(stop)
    free = max(0, capacity - len(keep))
    claim = sorted(desired_set - running_set)[:free]
    return ReconcilePlan(stop=stop, claim=claim)


class CameraRegistry:
    def __init__(self, client: redis.Redis, prefix: str, lease_s: float = 10.0) -> None:
        self.client = client
        self.prefix = prefix
        self.lease_ms = int(lease_s * 1000)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    @property
    def cameras_key(self) -> str:
        return f"{self.prefix}:cameras"

    def _lease_key(self, camera_id: str) -> str:
        return f"{self.prefix}:lease:{camera_id}"

    def _status_key(self, camera_id: str) -> str:
        return f"{self.prefix}:status:{camera_id}"

    # -- desired state (the API writes it) ------------------------------------------------
    def add(self, camera: SourceConfig) -> bool:
        """False when a camera with this id is already registered."""
        return bool(self.client.hsetnx(self.cameras_key, camera.camera_id, camera.model_dump_json()))

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
        value = self.client.get(self._lease_key(camera_id))
        return value.decode() if isinstance(value, bytes) else value

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
        return {camera_id: json.loads(value) for camera_id, value in zip(ids, raw, strict=True) if value is not None}
