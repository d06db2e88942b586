from __future__ import annotations

import threading

import pytest

from serve_app.batching import BusyAwareBatchWait


def test_idle_model_waits_only_the_base_wait() -> None:
    policy = BusyAwareBatchWait(0.01)
    assert policy.wait_timeout(now=100.0) == pytest.approx(0.01)
    policy.finished(4, 0.2)
    assert policy.wait_timeout(now=100.0) == pytest.approx(0.01)  # nothing running


def test_busy_model_extends_the_wait_to_the_expected_end_of_the_running_call() -> None:
    policy = BusyAwareBatchWait(0.01)
    policy.finished(2, 0.3)
    policy.started(2, now=10.0)
    assert policy.wait_timeout(now=10.1) == pytest.approx(0.01 + 0.2)
    assert policy.wait_timeout(now=10.5) == pytest.approx(0.01)  # overran its estimate: no extra wait
    policy.finished(2, 0.5)
    assert policy.wait_timeout(now=10.5) == pytest.approx(0.01)


def test_extra_wait_is_capped() -> None:
    policy = BusyAwareBatchWait(0.02, max_extra_wait_s=0.5)
    policy.finished(8, 30.0)  # one pathological call
    policy.started(8, now=0.0)
    assert policy.wait_timeout(now=0.0) == pytest.approx(0.52)


def test_expected_duration_is_a_moving_average_per_batch_size() -> None:
    policy = BusyAwareBatchWait(0.0, smoothing=0.5)
    assert policy.expected_duration(4) == 0.0  # nothing measured yet: no extra wait
    policy.finished(4, 0.4)
    policy.finished(4, 0.2)
    assert policy.expected_duration(4) == pytest.approx(0.3)
    policy.finished(1, 0.05)
    assert policy.expected_duration(1) == pytest.approx(0.05)
    assert policy.expected_duration(8) == pytest.approx(0.6)  # nearest size (4) scaled linearly
    assert policy.expected_duration(2) == pytest.approx(0.1)  # ties go to the smaller size (1)


def test_first_call_of_a_new_size_starts_from_the_nearest_estimate() -> None:
    policy = BusyAwareBatchWait(0.0)
    policy.finished(1, 0.1)
    policy.started(3, now=0.0)
    assert policy.wait_timeout(now=0.0) == pytest.approx(0.3)


@pytest.mark.parametrize(("base", "extra", "smoothing"), [(-0.1, 1.0, 0.2), (0.0, -1.0, 0.2), (0.0, 1.0, 0.0), (0.0, 1.0, 1.5)])
def test_rejects_bad_settings(base: float, extra: float, smoothing: float) -> None:
    with pytest.raises(ValueError):
        BusyAwareBatchWait(base, extra, smoothing)


def test_concurrent_updates_keep_a_consistent_average() -> None:
    policy = BusyAwareBatchWait(0.0, smoothing=1.0)

    def hammer() -> None:
        for _ in range(2000):
            policy.started(4, now=0.0)
            policy.finished(4, 0.25)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert policy.expected_duration(4) == 0.25
