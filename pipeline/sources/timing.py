"""The camera's clocks: the rate meter behind ``measured_fps``/``decoded_fps``, one timeline across
reconnects and loops, and the fps limit. Pure arithmetic on timestamps, no threads, no decoder."""

from __future__ import annotations

import collections

# A window long enough to smooth out a bursty network, short enough to show a stall quickly.
RATE_WINDOW_S = 5.0


class RateMeter:
    """Events per second over a sliding window (not thread-safe; callers hold the source lock)."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self._window_s = window_s
        self._stamps: collections.deque[float] = collections.deque()
        self._first: float | None = None

    def add(self, now: float) -> None:
        if self._first is None:
            self._first = now
        self._stamps.append(now)
        self._trim(now)

    def rate(self, now: float) -> float:
        if self._first is None:
            return 0.0
        self._trim(now)
        # Right after start the window is not full yet; dividing by it would under-report.
        span = min(self._window_s, now - self._first)
        return len(self._stamps) / span if span > 0 else 0.0

    def _trim(self, now: float) -> None:
        while self._stamps and self._stamps[0] < now - self._window_s:
            self._stamps.popleft()


class Timeline:
    """Turns per-stream PTS (missing, restarting at 0 after a reconnect or loop, or briefly
    out of order) into one strictly increasing presentation time per source."""

    def __init__(self) -> None:
        self._offset = 0.0
        self._last: float | None = None
        self._last_wall: float | None = None
        self._new_segment = True
        self._use_wall_gap = False

    def new_segment(self, use_wall_gap: bool) -> None:
        """The next frame comes from a freshly opened stream: its PTS restart anywhere.
        Live streams continue after the real time that passed, files right after the last frame."""
        self._new_segment = True
        self._use_wall_gap = use_wall_gap

    def next(self, raw_s: float | None, interval_s: float | None, wall: float) -> float:
        step = interval_s if interval_s else self._wall_step(wall)
        if self._last is None:
            value = raw_s if raw_s is not None else 0.0
            self._offset = value - (raw_s or 0.0)
        elif self._new_segment:
            gap = step
            if self._use_wall_gap and self._last_wall is not None:
                gap = max(step, wall - self._last_wall)
            value = self._last + gap
            if raw_s is not None:
                self._offset = value - raw_s
        elif raw_s is None:
            value = self._last + step
        else:
            value = raw_s + self._offset
            if value <= self._last:
                # Non-monotonic PTS (broken muxer, TS discontinuity, a B-frame glitch): keep the
                # output increasing and re-anchor so the following frames keep their spacing.
                value = self._last + step
                self._offset = value - raw_s
        self._new_segment = False
        self._last = value
        self._last_wall = wall
        return value

    def _wall_step(self, wall: float) -> float:
        if self._last_wall is None:
            return 1e-3
        return max(1e-3, wall - self._last_wall)


class FpsLimiter:
    """Admits at most ``fps`` frames per second of PTS. Due times advance by a fixed period
    rather than from the last admitted frame, so a 12.5 fps camera limited to 5 fps gets 5,
    not the 4.2 that "at least 0.2 s since the last one" would give."""

    def __init__(self, fps: float | None) -> None:
        self._period = 1.0 / fps if fps else None
        self._next_due: float | None = None

    def admit(self, pts_s: float) -> bool:
        if self._period is None:
            return True
        tolerance = self._period * 1e-3  # PTS are rationals turned into floats
        if self._next_due is None or pts_s - self._next_due > self._period:
            # First frame, or a gap (reconnect): start a fresh schedule instead of bursting.
            self._next_due = pts_s + self._period
            return True
        if pts_s >= self._next_due - tolerance:
            self._next_due += self._period
            return True
        return False
