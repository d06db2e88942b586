"""call_per_unit and FrameFailures: a unit that makes the model fail costs that unit only, and it is counted."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pytest

from pipeline.isolation import FrameFailures, UnitFailure, call_per_unit, describe_error
from pipeline.metrics import PipelineMetrics


class FakeModel:
    """Doubles its inputs; raises when any input is negative, like a detector given an impossible frame."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    def __call__(self, items: Sequence[int]) -> list[int]:
        self.calls.append(list(items))
        if any(item < 0 for item in items):
            raise ValueError(f"bad input {min(items)}")
        return [2 * item for item in items]


def test_good_units_share_one_call() -> None:
    model = FakeModel()
    assert call_per_unit(model, [[1], [2, 3], []]) == [[2], [4, 6], []]
    assert model.calls == [[1, 2, 3]]


def test_a_bad_unit_fails_alone_and_the_others_get_their_results() -> None:
    model = FakeModel()
    results = call_per_unit(model, [[1], [-1, 5], [], [3]])
    assert results[0] == [2] and results[2] == [] and results[3] == [6]
    failure = results[1]
    assert isinstance(failure, UnitFailure) and "bad input -1" in str(failure.error)
    # The batch once, then each non-empty unit alone.
    assert model.calls == [[1, -1, 5, 3], [1], [-1, 5], [3]]


def test_a_single_failing_unit_is_not_called_twice() -> None:
    model = FakeModel()
    [failure] = call_per_unit(model, [[-2]])
    assert isinstance(failure, UnitFailure)
    assert model.calls == [[-2]]


def test_units_marked_alone_are_never_batched_with_the_others() -> None:
    model = FakeModel()
    results = call_per_unit(model, [[1], [-1], [2], [3]], alone={1, 3})
    assert results[0] == [2] and results[2] == [4] and results[3] == [6] and isinstance(results[1], UnitFailure)
    assert model.calls == [[-1], [3], [1, 2]]  # the good ones share one call that nothing can spoil


def test_nothing_to_do_calls_nothing() -> None:
    model = FakeModel()
    assert call_per_unit(model, [[], []]) == [[], []]
    assert call_per_unit(model, []) == []
    assert model.calls == []


def test_a_wrong_number_of_results_is_a_failure_of_the_batch() -> None:
    def short(items: Sequence[int]) -> list[int]:
        return list(items)[:1]

    results = call_per_unit(short, [[1], [2, 3]])
    assert results[0] == [1]
    assert isinstance(results[1], UnitFailure) and "2 inputs" in str(results[1].error)


def test_frame_failures_count_per_camera_and_stage_and_log_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    metrics = PipelineMetrics()
    failures = FrameFailures(metrics, logging.getLogger("test.isolation"))
    with caplog.at_level(logging.WARNING, logger="test.isolation"):
        for frame in range(3):
            failures.record("thin", "detect", frame, ValueError("torch.cat(): expected a non-empty list of Tensors"))
        failures.record("good", "publish", 7, RuntimeError("boom"))
    value = metrics.registry.get_sample_value
    assert value("ferstream_frames_failed_total", {"camera": "thin", "stage": "detect"}) == 3
    assert value("ferstream_frames_failed_total", {"camera": "good", "stage": "publish"}) == 1
    assert value("ferstream_frames_failed_total", {"camera": "good", "stage": "detect"}) is None
    assert failures.counts() == {"thin": {"detect": 3}, "good": {"publish": 1}}
    lines = [record.getMessage() for record in caplog.records]
    assert lines == [
        "camera thin: frame 0 lost in detect: ValueError: torch.cat(): expected a non-empty list of Tensors",
        "camera good: frame 7 lost in publish: RuntimeError: boom",
    ]
    assert caplog.records[0].exc_info is not None  # the traceback of the first of its kind
    with pytest.raises(ValueError, match="unknown stage"):
        failures.record("thin", "decode", 0, ValueError("x"))


def test_a_camera_that_failed_is_suspect_for_a_while() -> None:
    now = [0.0]
    failures = FrameFailures(PipelineMetrics(), logging.getLogger("test.isolation"), suspect_s=10.0, clock=lambda: now[0])
    failures.record("thin", "detect", 0, ValueError("x"))
    assert failures.recently_failed("thin", "detect") and not failures.recently_failed("thin", "classify")
    assert not failures.recently_failed("good", "detect")
    now[0] = 10.5
    assert not failures.recently_failed("thin", "detect")
    failures.record("thin", "detect", 1, ValueError("x"))
    failures.forget_camera("thin")
    assert not failures.recently_failed("thin", "detect") and failures.counts() == {}


def test_describe_error_keeps_the_first_line_only() -> None:
    assert describe_error(ValueError("first\nsecond")) == "ValueError: first"
    assert describe_error(KeyError()) == "KeyError"
    assert len(describe_error(ValueError("x" * 1000))) < 250
