"""Shutting a worker down without losing events: stop decoding, flush the outage buffer, release leases.

The order is the point:

1. stop decoding every camera at once, so no new events are made and one camera slow to stop
   does not hold up the others (``stop_cameras``, or ``ShardWorker.stop_all``);
2. flush the publisher's outage buffer: events buffered while Redis was down reach the stream
   before another worker takes the cameras over, so each camera's events stay in order across
   the handover;
3. release the leases of the cameras that stopped, so another worker claims them at once rather
   than after ``lease_s``; one still decoding keeps its lease until it expires.

Each step has its own bound and ``ShutdownBudget.bound_s`` adds them up: it must fit in the grace
period the platform gives (Serve's ``graceful_shutdown_timeout_s``; Kubernetes'
``terminationGracePeriodSeconds`` for ``ferstream run``), or the process is killed mid-flush.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from pipeline.events import EventPublisher
from pipeline.registry import ShardWorker

log = logging.getLogger("ferstream.shutdown")


@dataclass(frozen=True)
class ShutdownBudget:
    stop_s: float = 8.0  # all cameras stop in parallel; one still blocked after this is left to its thread
    flush_s: float = 10.0  # the outage buffer's delivery (500 events per round-trip)

    def bound_s(self, socket_timeout_s: float) -> float:
        """The longest a shutdown takes: the steps' bounds, plus a write in flight when the flush
        ends (``EventPublisher.close`` joins it: socket timeout + 1 s) and the two round-trips of
        the release (leases, then the workers set)."""
        return self.stop_s + self.flush_s + (socket_timeout_s + 1.0) + 2 * socket_timeout_s


@dataclass(frozen=True)
class ShutdownReport:
    still_stopping: list[str]  # cameras whose decoding had not stopped within stop_s
    undelivered: int  # events left in the buffer after flush_s (counted in events_dropped{reason="closed"})
    released: list[str]  # leases freed for another worker
    duration_s: float


def stop_cameras(stops: Iterable[tuple[str, Callable[[], None]]], timeout_s: float) -> list[str]:
    """Run each camera's stop in its own thread and wait up to ``timeout_s`` for all of them;
    returns the cameras still stopping then (their threads are daemons and finish on their own)."""
    threads = {camera_id: threading.Thread(target=stop, name=f"ferstream-stop-{camera_id}", daemon=True) for camera_id, stop in stops}
    for thread in threads.values():
        thread.start()
    deadline = time.monotonic() + timeout_s
    for thread in threads.values():
        thread.join(max(0.0, deadline - time.monotonic()))
    return sorted(camera_id for camera_id, thread in threads.items() if thread.is_alive())


def flush_and_close(publisher: EventPublisher, flush_s: float) -> int:
    """Deliver the outage buffer for up to ``flush_s``, then close; returns the events left undelivered."""
    publisher.flush(flush_s)
    undelivered = publisher.buffered
    publisher.close(timeout_s=0.0)
    return undelivered


def shut_down_worker(shard: ShardWorker, publisher: EventPublisher, budget: ShutdownBudget) -> ShutdownReport:
    """Stop every camera, flush the events, release the leases: in that order, within ``budget``."""
    started = time.monotonic()
    still_stopping = shard.stop_all(budget.stop_s)
    if still_stopping:
        log.warning(
            "worker %s: cameras %s still stopping after %.1fs; their leases expire on their own",
            shard.worker_id,
            still_stopping,
            budget.stop_s,
        )
    undelivered = flush_and_close(publisher, budget.flush_s)
    released = shard.release_all()
    report = ShutdownReport(still_stopping, undelivered, released, time.monotonic() - started)
    log.info(
        "worker %s: shut down in %.1fs (%d leases released, %d events undelivered)",
        shard.worker_id,
        report.duration_s,
        len(released),
        undelivered,
    )
    return report
