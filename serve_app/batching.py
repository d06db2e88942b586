"""When a batch of model requests should close: the dynamic-batching policy of the model deployments.

A model replica runs one batch at a time. Ray Serve's ``@serve.batch`` closes a batch when it is
full or when ``batch_wait_timeout_s`` has passed since its first request, and then the batch waits
for the model. With a short fixed timeout and a busy model, batches therefore close with one or
two requests and queue behind the running call, so the model never sees a full batch; with a long
fixed timeout, a lone camera waits for nothing. :class:`BusyAwareBatchWait` gives the timeout for
the batch that starts now: the configured base wait while the model is idle, and, while a call is
running, the time that call is still expected to take. Requests that arrive meanwhile join the
batch that will run next (as Triton's dynamic batcher does), and an idle model starts at once.
"""

from __future__ import annotations

import threading

__all__ = ["BusyAwareBatchWait"]


class BusyAwareBatchWait:
    """Expected model-call durations per batch size (exponential moving averages) and the wait
    timeout that follows from them. Thread-safe: calls finish on worker threads."""

    def __init__(self, base_wait_s: float, max_extra_wait_s: float = 1.0, smoothing: float = 0.2) -> None:
        if base_wait_s < 0 or max_extra_wait_s < 0:
            raise ValueError(f"waits must be >= 0, got base_wait_s={base_wait_s} max_extra_wait_s={max_extra_wait_s}")
        if not 0 < smoothing <= 1:
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing}")
        # The configured wait (``batch_wait_timeout_s`` in a deployment's user_config); the busy
        # extension is capped so one stuck call cannot hold every later request.
        self.base_wait_s = base_wait_s
        self.max_extra_wait_s = max_extra_wait_s
        self.smoothing = smoothing
        self._durations: dict[int, float] = {}
        self._busy_until: float | None = None
        self._lock = threading.Lock()

    def expected_duration(self, batch_size: int) -> float:
        """Seconds a call on ``batch_size`` items is expected to take: the average for that size,
        else the nearest measured size scaled linearly, else 0 (nothing measured yet)."""
        with self._lock:
            if batch_size in self._durations:
                return self._durations[batch_size]
            if not self._durations:
                return 0.0
            nearest = min(self._durations, key=lambda size: (abs(size - batch_size), size))
            return self._durations[nearest] * batch_size / nearest

    def wait_timeout(self, now: float) -> float:
        """The ``batch_wait_timeout_s`` for a batch whose first request arrives at ``now``."""
        with self._lock:
            busy_for = 0.0 if self._busy_until is None else max(0.0, self._busy_until - now)
        return self.base_wait_s + min(self.max_extra_wait_s, busy_for)

    def started(self, batch_size: int, now: float) -> None:
        expected = self.expected_duration(batch_size)
        with self._lock:
            self._busy_until = now + expected

    def finished(self, batch_size: int, duration_s: float) -> None:
        with self._lock:
            previous = self._durations.get(batch_size)
            self._durations[batch_size] = duration_s if previous is None else previous + self.smoothing * (duration_s - previous)
            self._busy_until = None
