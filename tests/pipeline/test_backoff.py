import random

from pipeline.backoff import Backoff
from pipeline.config import BackoffConfig


def test_grows_exponentially_to_the_cap_without_jitter():
    backoff = Backoff(BackoffConfig(initial_s=0.5, max_s=3.0, multiplier=2.0, jitter=0.0))
    assert [backoff.next_delay() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    backoff.reset()
    assert backoff.next_delay() == 0.5


def test_jitter_stays_within_its_fraction_and_the_cap():
    config = BackoffConfig(initial_s=1.0, max_s=4.0, multiplier=2.0, jitter=0.25)
    backoff = Backoff(config, rng=random.Random(7))
    delays = [backoff.next_delay() for _ in range(4)]
    for delay, base in zip(delays, [1.0, 2.0, 4.0, 4.0], strict=True):
        assert base * 0.75 <= delay <= min(4.0, base * 1.25)
    assert len(set(delays)) == len(delays), "jitter spreads the delays"
