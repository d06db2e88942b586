"""The event publisher: emission policy, outage buffering, ordering and retry, in front of an ``EventSink``.

Delivery is at-least-once: the publisher never raises into the pipeline when its sink is
unavailable, it buffers a bounded number of events in memory and a background thread
delivers them, in order, when the sink comes back. A write that failed half-way can be
retried whole, so a consumer may (rarely) see an event twice; ``(camera_id, run_id,
frame_index, track_id)`` identifies an event for de-duplication (``run_id`` is new at every
start of a camera, so the key does not repeat after a restart).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from itertools import islice
from typing import Literal

from pipeline.backoff import Backoff
from pipeline.config import EventsConfig
from pipeline.events.policy import EmissionPolicy
from pipeline.events.record import ExpressionEvent
from pipeline.events.sink import EventSink, EventSinkUnavailable
from pipeline.events.sinks import build_sink
from pipeline.log_limits import RepeatLimitedLog
from pipeline.metrics import PipelineMetrics

log = logging.getLogger("ferstream.events")

# Events written per sink call while draining the outage buffer: large enough to catch up
# quickly, small enough that one Redis round-trip stays well inside socket_timeout_s.
DRAIN_BATCH_EVENTS = 500


class EventPublisher:
    """Writes a camera's events for one frame with one sink call (for Redis: one pipelined round-trip).

    While the sink is unavailable the events go to a bounded FIFO buffer (the oldest are dropped
    when it is full) and a background flusher thread retries with exponential backoff. The
    thread, rather than retry-on-next-publish, is what delivers the backlog: a camera that
    went quiet (or a pipeline that stopped) would otherwise leave its last events stuck in
    memory, and a retry inside ``publish`` could block a frame for ``socket_timeout_s`` on
    every attempt. While anything is buffered, new events are appended behind it, so each
    camera's events reach the sink in order; only the first write that fails costs the frame
    a round-trip (bounded by ``socket_timeout_s`` for Redis).

    Without a ``sink`` the publisher builds the one ``config.sink`` names and closes it on
    ``close``; a sink it is given stays the caller's.
    """

    def __init__(
        self,
        config: EventsConfig,
        metrics: PipelineMetrics,
        sink: EventSink | None = None,
        *,
        policy: EmissionPolicy | None = None,
        wall_clock: Callable[[], float] = time.time,
        policy_clock: Callable[[], float] = time.monotonic,
        drain_batch: int = DRAIN_BATCH_EVENTS,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.policy = policy if policy is not None else EmissionPolicy.from_config(config)
        self._owns_sink = sink is None
        self.sink = sink if sink is not None else build_sink(config)
        self._wall_clock = wall_clock
        self._policy_clock = policy_clock
        self._drain_batch = max(1, drain_batch)

        # _cond guards everything below it; the sink is never called while holding it.
        self._cond = threading.Condition(threading.Lock())
        self._buffer: deque[ExpressionEvent] = deque()
        self._in_flight: list[ExpressionEvent] = []  # taken from the buffer by the flusher, write pending
        self._degraded = False  # True from a failed write until the backlog is fully delivered
        self._closed = False
        self._overflow_logged = False  # one warning per outage, not one per dropped event
        self._flusher: threading.Thread | None = None
        self._wake = threading.Event()  # cuts a backoff sleep short (flush(), close())
        self._log = RepeatLimitedLog(log)

    # -- public API -----------------------------------------------------------------------------
    def publish(self, camera_id: str, events: list[ExpressionEvent]) -> list[ExpressionEvent]:
        """Emit one processed frame's events (after the emission policy); never raises for sink trouble.

        Returns the events selected for emission, stamped with ``publish_time``, whether they
        were written now or buffered for later.
        """
        started = time.perf_counter()
        try:
            selected = self.policy.select(camera_id, events, self._policy_clock())
            if not selected:
                return []
            now = self._wall_clock()
            stamped = [event.with_publish_time(now) for event in selected]
            with self._cond:
                if self._closed:
                    self._log.warning(camera_id, "camera %s: publish after close; %d events dropped", camera_id, len(stamped))
                    self.metrics.events_dropped.labels(camera=camera_id, reason="closed").inc(len(stamped))
                    return stamped
                write_now = not self._degraded
                if not write_now:
                    self._enqueue_locked(stamped)
            if write_now:
                try:
                    self.sink.write(stamped)
                except EventSinkUnavailable as error:
                    # The family keeps its historical name (dashboards query it); it counts failed writes of any sink.
                    self.metrics.redis_errors.inc()
                    log.warning("%s write failed (%s); buffering events until it is back", self.sink.name, error)
                    with self._cond:
                        self._degraded = True
                        self._enqueue_locked(stamped)
                    self._ensure_flusher()
                else:
                    self._delivered(stamped)
            return stamped
        finally:
            self.metrics.stage_latency.labels(stage="publish").observe(time.perf_counter() - started)

    @property
    def buffered(self) -> int:
        """Events held in memory, including a batch the flusher is writing right now."""
        with self._cond:
            return len(self._buffer) + len(self._in_flight)

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Try to deliver the buffer now and wait up to ``timeout_s``; True when it is empty."""
        deadline = time.monotonic() + timeout_s
        self._wake.set()  # skip the rest of the current backoff sleep
        with self._cond:
            while self._degraded and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return not self._buffer and not self._in_flight

    def close(self, timeout_s: float = 5.0) -> None:
        """Deliver what can be delivered within ``timeout_s``, then stop; what is left is
        counted in ``events_dropped{reason="closed"}``. Idempotent."""
        with self._cond:
            if self._closed:
                return
        self.flush(timeout_s)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._wake.set()
        if self._flusher is not None:
            # A write in progress finishes within the socket timeout.
            self._flusher.join(timeout=self.config.socket_timeout_s + 1.0)
        with self._cond:
            lost = list(self._in_flight) + list(self._buffer)
            self._buffer.clear()
            self._in_flight.clear()
            self._degraded = False
            self._set_buffer_gauge_locked()
        for event in lost:
            self.metrics.events_dropped.labels(camera=event.camera_id, reason="closed").inc()
        if lost:
            log.error("closed with %d events still undelivered; they are lost", len(lost))
        if self._owns_sink:
            self.sink.close()

    # -- internals ------------------------------------------------------------------------------
    def _delivered(self, batch: Sequence[ExpressionEvent]) -> None:
        for event in batch:
            self.metrics.events_published.labels(camera=event.camera_id).inc()
            self.metrics.end_to_end_latency.labels(camera=event.camera_id).observe(max(0.0, event.publish_time - event.capture_time))

    def _enqueue_locked(self, batch: Sequence[ExpressionEvent]) -> None:
        self._buffer.extend(batch)
        self._trim_locked()
        self._set_buffer_gauge_locked()
        self._cond.notify_all()

    def _trim_locked(self) -> None:
        # The batch in flight is not counted against the bound: it is older than everything
        # in the buffer, and whether it is lost is only known when its write returns. If the
        # write fails it goes back to the front and is trimmed first, so the survivors are
        # always the newest buffer_max_events.
        overflow = len(self._buffer) - self.config.buffer_max_events
        if overflow <= 0:
            return
        for _ in range(overflow):
            event = self._buffer.popleft()
            self.metrics.events_dropped.labels(camera=event.camera_id, reason="buffer_full").inc()
        if not self._overflow_logged:
            self._overflow_logged = True
            limit = self.config.buffer_max_events
            log.warning("event buffer full (%d events): dropping the oldest until %s is back", limit, self.sink.name)

    def _set_buffer_gauge_locked(self) -> None:
        self.metrics.events_buffered.set(len(self._buffer) + len(self._in_flight))

    def _ensure_flusher(self) -> None:
        with self._cond:
            if self._closed or (self._flusher is not None and self._flusher.is_alive()):
                return
            self._flusher = threading.Thread(target=self._flush_loop, name="ferstream-events-flusher", daemon=True)
            self._flusher.start()

    def _flush_loop(self) -> None:
        backoff = Backoff(self.config.retry)
        while True:
            with self._cond:
                while not self._degraded and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
            # Wait before retrying: the write that put us here has only just failed.
            if self._wake.wait(backoff.next_delay()):
                self._wake.clear()
            outcome = "more"
            while outcome == "more":
                outcome = self._drain_step()
            if outcome == "done":
                backoff.reset()

    def _drain_step(self) -> Literal["more", "done", "failed", "closed"]:
        """Write the oldest batch of the buffer once."""
        with self._cond:
            if self._closed:
                return "closed"
            if not self._buffer:
                return self._recovered_locked()
            self._in_flight = list(islice(self._buffer, self._drain_batch))
            for _ in self._in_flight:
                self._buffer.popleft()
            # Re-stamp: publish_time is when the event actually reached the sink, so the
            # end-to-end latency includes the outage.
            now = self._wall_clock()
            batch = [event.with_publish_time(now) for event in self._in_flight]
        try:
            self.sink.write(batch)
        except Exception as error:  # anything: the flusher thread must survive to deliver the rest
            if isinstance(error, EventSinkUnavailable):
                self.metrics.redis_errors.inc()
                log.debug("%s still unavailable (%s); %d events buffered", self.sink.name, error, self.buffered)
            else:
                log.exception("unexpected error writing buffered events; will retry")
            with self._cond:
                self._buffer.extendleft(reversed(self._in_flight))
                self._in_flight = []
                self._trim_locked()
                self._set_buffer_gauge_locked()
            return "failed"
        self._delivered(batch)
        with self._cond:
            self._in_flight = []
            self._set_buffer_gauge_locked()
            if not self._buffer:
                return self._recovered_locked()
        return "more"

    def _recovered_locked(self) -> Literal["done"]:
        # Only here, with the buffer empty under the lock, may publish() write directly again;
        # any event enqueued before this point has already been delivered, so order holds.
        if self._degraded:
            log.info("%s reachable again; event backlog delivered", self.sink.name)
        self._degraded = False
        self._overflow_logged = False
        self._cond.notify_all()
        return "done"
