"""Exponential backoff with jitter and a cap, for reconnecting sources and retrying Redis."""

from __future__ import annotations

import random

from pipeline.config import BackoffConfig


class Backoff:
    """Delays grow ``initial_s * multiplier**n`` up to ``max_s``; jitter spreads them so that
    many cameras that lost the same server do not reconnect in lock-step."""

    def __init__(self, config: BackoffConfig, rng: random.Random | None = None) -> None:
        self.config = config
        self.attempts = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        base = min(self.config.max_s, self.config.initial_s * self.config.multiplier**self.attempts)
        self.attempts += 1
        spread = base * self.config.jitter
        return max(0.0, min(self.config.max_s, base + self._rng.uniform(-spread, spread)))

    def reset(self) -> None:
        self.attempts = 0
