"""Rate-limited logging of messages that repeat: one camera failing on every frame must not flood the log.

``RepeatLimitedLog`` logs the first message of a key at once, then at most one per
``interval_s`` for that key, and that one says how many were suppressed since the last. The
key names the repeating thing (e.g. camera, stage and error); messages with different keys
never hide each other.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

# Once per 30 s per key: the first failure is seen at once, a failing camera costs two lines a minute.
REPEAT_LOG_INTERVAL_S = 30.0
# Keys remembered at most; older ones are pruned first (a key whose interval has passed logs at once anyway).
MAX_KEYS = 4096


class RepeatLimitedLog:
    """Thread-safe; ``clock`` is injectable for tests."""

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = REPEAT_LOG_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = MAX_KEYS,
    ) -> None:
        if interval_s < 0:
            raise ValueError(f"interval_s must be >= 0, got {interval_s}")
        self.logger = logger
        self.interval_s = interval_s
        self.max_keys = max(1, max_keys)
        self._clock = clock
        self._lock = threading.Lock()
        self._last_logged: dict[Hashable, float] = {}
        self._suppressed: dict[Hashable, int] = {}

    def log(self, level: int, key: Hashable, message: str, *args: Any, exc_info: Any = None) -> bool:
        """Log ``message % args`` unless ``key`` was logged less than ``interval_s`` ago; True when logged."""
        now = self._clock()
        with self._lock:
            last = self._last_logged.get(key)
            if last is not None and now - last < self.interval_s:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return False
            if key not in self._last_logged and len(self._last_logged) >= self.max_keys:
                self._prune_locked(now)
            self._last_logged[key] = now
            suppressed = self._suppressed.pop(key, 0)
        if suppressed and last is not None:
            message += f" ({suppressed} more like this in the last {now - last:.0f}s not logged)"
        self.logger.log(level, message, *args, exc_info=exc_info)
        return True

    def warning(self, key: Hashable, message: str, *args: Any, exc_info: Any = None) -> bool:
        return self.log(logging.WARNING, key, message, *args, exc_info=exc_info)

    def error(self, key: Hashable, message: str, *args: Any, exc_info: Any = None) -> bool:
        return self.log(logging.ERROR, key, message, *args, exc_info=exc_info)

    def suppressed(self, key: Hashable) -> int:
        """Messages of ``key`` not logged since the last one that was."""
        with self._lock:
            return self._suppressed.get(key, 0)

    def _prune_locked(self, now: float) -> None:
        expired = [key for key, last in self._last_logged.items() if now - last >= self.interval_s]
        for key in expired:
            del self._last_logged[key]
            self._suppressed.pop(key, None)
        if len(self._last_logged) >= self.max_keys:
            # All recent: forget the oldest half rather than grow without bound.
            for key in sorted(self._last_logged, key=self._last_logged.__getitem__)[: len(self._last_logged) // 2]:
                del self._last_logged[key]
                self._suppressed.pop(key, None)
