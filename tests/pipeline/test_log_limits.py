"""RepeatLimitedLog: the first message of a key at once, then one per interval with the count of those held back."""

from __future__ import annotations

import logging

import pytest

from pipeline.log_limits import RepeatLimitedLog


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records]


def test_a_repeated_message_is_logged_once_per_interval_with_the_suppressed_count(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    limited = RepeatLimitedLog(logging.getLogger("test.limits"), interval_s=30.0, clock=clock)
    with caplog.at_level(logging.WARNING, logger="test.limits"):
        assert limited.warning(("cam1", "detect"), "camera %s failed", "cam1")
        for _ in range(5):
            clock.now += 1.0
            assert not limited.warning(("cam1", "detect"), "camera %s failed", "cam1")
        assert limited.suppressed(("cam1", "detect")) == 5
        clock.now += 30.0
        assert limited.warning(("cam1", "detect"), "camera %s failed", "cam1")
    assert messages(caplog) == ["camera cam1 failed", "camera cam1 failed (5 more like this in the last 35s not logged)"]
    assert limited.suppressed(("cam1", "detect")) == 0
    assert all(record.levelno == logging.WARNING for record in caplog.records)


def test_keys_do_not_hide_each_other(caplog: pytest.LogCaptureFixture) -> None:
    limited = RepeatLimitedLog(logging.getLogger("test.limits"), interval_s=30.0, clock=Clock())
    with caplog.at_level(logging.WARNING, logger="test.limits"):
        assert limited.warning("cam1", "one")
        assert limited.error("cam2", "two")
        assert not limited.warning("cam1", "one again")
    assert messages(caplog) == ["one", "two"]
    assert caplog.records[1].levelno == logging.ERROR


def test_the_key_table_stays_bounded() -> None:
    clock = Clock()
    limited = RepeatLimitedLog(logging.getLogger("test.limits"), interval_s=30.0, clock=clock, max_keys=8)
    for index in range(100):
        clock.now += 0.001
        limited.warning(index, "message %d", index)
    assert len(limited._last_logged) <= 8
    assert not limited.warning(99, "the newest key is still limited")


def test_a_negative_interval_is_refused() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        RepeatLimitedLog(logging.getLogger("test.limits"), interval_s=-1.0)
