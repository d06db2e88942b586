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
import threading
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

    def renew_many(self, camera_ids: Iterable[str], owner: str) -> dict[str, bool]:
        """Renew several leases in one round-trip: how long a renewal takes does not grow with cameras."""
        ids = list(camera_ids)
        if not ids:
            return {}
        pipe = self.client.pipeline(transaction=False)
        for camera_id in ids:
            self._renew(keys=[self._lease_key(camera_id)], args=[owner, self.lease_ms], client=pipe)
        return {camera_id: bool(result) for camera_id, result in zip(ids, pipe.execute(), strict=True)}

    def release(self, camera_id: str, owner: str) -> None:
        self._release(keys=[self._lease_key(camera_id)], args=[owner])

    def release_many(self, camera_ids: Iterable[str], owner: str) -> None:
        """Release several leases in one round-trip (a shutdown's time does not grow with cameras)."""
        ids = list(camera_ids)
        if not ids:
            return
        pipe = self.client.pipeline(transaction=False)
        for camera_id in ids:
            self._release(keys=[self._lease_key(camera_id)], args=[owner], client=pipe)
        pipe.execute()

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


# What part of a lease a worker gives up as a safety margin: it stops decoding a camera once
# (lease - margin) has passed since the last renewal it *sent* that succeeded. The lease began on
# the server no earlier than the send, so the camera is stopped before any other worker can claim it,
# with ``margin`` left for the decode thread to notice the stop.
DEFAULT_FENCE_FRACTION = 1 / 3
# How long ``reconcile`` waits for the cameras it stops: quick stops finish (and free their lease)
# within the tick, a slow one goes on in the background without holding up the others.
DEFAULT_STOP_WAIT_S = 1.0


class LeaseFence:
    """When each held lease must be treated as lost, from this process's monotonic clock.

    Not thread-safe on its own: ``ShardWorker`` calls it under its lock."""

    def __init__(self, lease_s: float, margin_s: float) -> None:
        if not 0 < margin_s < lease_s:
            raise ValueError(f"the fence margin must be within the lease (0 < margin_s < {lease_s}), got {margin_s}")
        self.lease_s = lease_s
        self.margin_s = margin_s
        self._valid_until: dict[str, float] = {}

    def held(self, camera_id: str, sent_at: float) -> None:
        """A claim or renewal sent at ``sent_at`` succeeded."""
        self._valid_until[camera_id] = max(self._valid_until.get(camera_id, -math.inf), sent_at + self.lease_s - self.margin_s)

    def forget(self, camera_id: str) -> None:
        self._valid_until.pop(camera_id, None)

    def expired(self, now: float) -> list[str]:
        return sorted(camera_id for camera_id, until in self._valid_until.items() if now >= until)

    def remaining_s(self, camera_id: str, now: float) -> float | None:
        until = self._valid_until.get(camera_id)
        return None if until is None else until - now


class ShardWorker:
    """One ingest worker's side of the registry: each ``reconcile`` renews its leases, stops the
    cameras it lost or that were removed or changed, and claims free cameras up to a fair share
    (``ceil(cameras / live workers)``, at most ``max_cameras``), so that replicas started together
    split the cameras. Cameras are not moved from a busy worker to a newer one; they move when a
    worker dies or its cameras are removed.

    Fencing: ``enforce_fence`` (run by ``start_fence``'s thread, independent of Redis calls that
    may hang for ``socket_timeout_s``) stops every camera whose lease could not be renewed in time,
    before the lease can expire and another worker claim it. Stops run in background threads, each
    camera's own, so one camera that is slow to stop never delays the others or the renewals; its
    lease is released only once its decoding stopped (so two workers never decode it at once)."""

    def __init__(
        self,
        registry: CameraRegistry,
        worker_id: str,
        start: Callable[[SourceConfig], None],
        stop: Callable[[str], None],
        *,
        fence_margin_s: float | None = None,
        stop_wait_s: float = DEFAULT_STOP_WAIT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.worker_id = worker_id
        self._start = start
        self._stop = stop
        lease_s = registry.lease_ms / 1000
        self.fence = LeaseFence(lease_s, lease_s * DEFAULT_FENCE_FRACTION if fence_margin_s is None else fence_margin_s)
        self.stop_wait_s = stop_wait_s
        self._clock = clock
        # _lock guards running, fence and _stopping; never held across a Redis call or a stop.
        self._lock = threading.Lock()
        self.running: dict[str, SourceConfig] = {}
        self._stopping: dict[str, threading.Thread] = {}
        self.fenced: list[str] = []  # cameras stopped by the fence, oldest first (for operators and tests)
        self._shutdown_stopped: list[str] = []  # what stop_all stopped in time: release_all frees those leases
        self._closed = False  # set by stop_all: a reconcile tick still running then claims nothing more
        self._fence_thread: threading.Thread | None = None
        self._fence_stop = threading.Event()
        # A camera that cannot start is retried every tick: log it once per interval, with a count.
        self._start_errors = RepeatLimitedLog(log)
        self._release_errors = RepeatLimitedLog(log)

    @property
    def stopping(self) -> list[str]:
        with self._lock:
            return sorted(self._stopping)

    def reconcile(self, max_cameras: int) -> ReconcilePlan:
        desired = self.registry.cameras()
        workers = self.registry.heartbeat(self.worker_id)
        with self._lock:
            held = sorted(self.running)
        sent_at = self._clock()
        renewed = self.registry.renew_many(held, self.worker_id)
        with self._lock:
            for camera_id in held:
                if renewed[camera_id] and camera_id in self.running:
                    self.fence.held(camera_id, sent_at)
            running = dict(self.running)
            stopping = set(self._stopping)
        lost = [camera_id for camera_id in held if not renewed[camera_id]]
        changed = [camera_id for camera_id, camera in running.items() if camera_id in desired and desired[camera_id] != camera]
        # A camera still stopping here is not claimed again until its old session is gone.
        candidates = sorted(set(desired) - set(running) - stopping)
        free = [camera_id for camera_id, owner in self.registry.owners(candidates).items() if owner is None]
        share = min(max_cameras, math.ceil(len(desired) / max(1, workers)))
        plan = plan_reconcile(desired, running, [*lost, *changed], share, unowned=free)
        self._wait(self._stop_in_background(plan.stop, release=True), self.stop_wait_s)
        for camera_id in plan.claim:
            if self._closed:
                break
            sent_at = self._clock()
            if not self.registry.claim(camera_id, self.worker_id):
                continue  # another worker was faster
            try:
                self._start(desired[camera_id])
            except Exception as error:
                # Let another worker (or the next tick) try rather than hold a lease on nothing.
                self._start_errors.error(
                    (camera_id, type(error).__name__), "worker %s: could not start camera %s", self.worker_id, camera_id, exc_info=error
                )
                self._release(camera_id)
                continue
            with self._lock:
                self.running[camera_id] = desired[camera_id]
                self.fence.held(camera_id, sent_at)
                closed = self._closed
            if closed:  # stop_all ran while it started: stop it too, as stop_all would have
                self._stop_in_background([camera_id], release=True)
        return plan

    # -- fencing ------------------------------------------------------------------------------
    def enforce_fence(self) -> list[str]:
        """Stop (in the background) every camera whose lease may no longer be ours; returns them."""
        with self._lock:
            expired = [camera_id for camera_id in self.fence.expired(self._clock()) if camera_id in self.running]
        if expired:
            log.warning("worker %s: leases of %s not renewed in time; stopping them before they expire", self.worker_id, ", ".join(expired))
            with self._lock:
                self.fenced.extend(expired)
            # Release too: when the lease was stolen the compare-and-delete does nothing, and when
            # Redis is down the release fails and the lease expires on its own.
            self._stop_in_background(expired, release=True)
        return expired

    def start_fence(self, interval_s: float) -> None:
        """Check the fence every ``interval_s`` in a daemon thread until ``stop_fence``."""
        if self._fence_thread is not None:
            return
        self._fence_thread = threading.Thread(target=self._fence_loop, args=(interval_s,), name="ferstream-lease-fence", daemon=True)
        self._fence_thread.start()

    def stop_fence(self) -> None:
        self._fence_stop.set()
        if self._fence_thread is not None:
            self._fence_thread.join(timeout=5.0)

    @property
    def fence_alive(self) -> bool:
        return self._fence_thread is not None and self._fence_thread.is_alive()

    def _fence_loop(self, interval_s: float) -> None:
        while not self._fence_stop.wait(interval_s):
            try:
                self.enforce_fence()
            except Exception:  # the fence must outlive any one failure, or a lost lease goes on decoding
                log.exception("worker %s: lease fence check failed", self.worker_id)

    # -- stopping -----------------------------------------------------------------------------
    def _stop_in_background(self, camera_ids: Iterable[str], release: bool) -> list[threading.Thread]:
        threads = []
        with self._lock:
            for camera_id in camera_ids:
                if self.running.pop(camera_id, None) is None:
                    continue  # already stopping (the fence and a reconcile can both find it)
                self.fence.forget(camera_id)
                thread = threading.Thread(target=self._stop_one, args=(camera_id, release), name=f"ferstream-stop-{camera_id}", daemon=True)
                self._stopping[camera_id] = thread
                threads.append(thread)
        for thread in threads:
            thread.start()
        return threads

    def _stop_one(self, camera_id: str, release: bool) -> None:
        try:
            self._stop(camera_id)
        except Exception:
            log.exception("worker %s: stopping camera %s failed", self.worker_id, camera_id)
        finally:
            try:
                if release:
                    self._release(camera_id)
            finally:  # whatever the release did: a camera left in _stopping would never be claimed again
                with self._lock:
                    self._stopping.pop(camera_id, None)

    def _release(self, camera_id: str) -> None:
        try:
            self.registry.release(camera_id, self.worker_id)
        except Exception as error:  # Redis errors, or a client closed under it: never fatal to the stop thread
            # Not fatal: the lease expires within lease_s and nobody renews it.
            self._release_errors.warning(
                type(error).__name__, "worker %s: could not release camera %s: %s", self.worker_id, camera_id, error
            )

    def _wait(self, threads: Iterable[threading.Thread], timeout_s: float) -> bool:
        deadline = self._clock() + timeout_s
        for thread in threads:
            thread.join(max(0.0, deadline - self._clock()))
        return not any(thread.is_alive() for thread in threads)

    def wait_stopped(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for every background stop; True when none is left."""
        with self._lock:
            threads = list(self._stopping.values())
        return self._wait(threads, timeout_s)

    # -- shutdown -----------------------------------------------------------------------------
    def stop_all(self, timeout_s: float) -> list[str]:
        """Shutdown, first step: stop every camera at once (leases kept) and wait up to ``timeout_s``.

        Returns the cameras still decoding when the time was up."""
        self.stop_fence()
        with self._lock:
            self._closed = True
            camera_ids = sorted(self.running)
        self._stop_in_background(camera_ids, release=False)
        self.wait_stopped(timeout_s)
        self._shutdown_stopped = [camera_id for camera_id in camera_ids if camera_id not in self.stopping]
        return self.stopping

    def release_all(self) -> list[str]:
        """Shutdown, last step: free the leases of the cameras ``stop_all`` stopped (one still
        decoding keeps its lease until it expires, so no other worker decodes it meanwhile), and
        leave the live workers. Returns the cameras released."""
        released, self._shutdown_stopped = self._shutdown_stopped, []
        try:
            self.registry.release_many(released, self.worker_id)
        except redis.RedisError as error:
            log.warning("worker %s: could not release %d leases (they expire within the lease): %s", self.worker_id, len(released), error)
            released = []
        try:
            self.registry.leave(self.worker_id)
        except redis.RedisError as error:
            log.warning("worker %s: could not leave the workers set: %s", self.worker_id, error)
        return released

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self.stop_all(timeout_s)
        self.release_all()
