"""The camera's clocks: the fps limit and the timeline that repairs PTS."""

from __future__ import annotations

from itertools import pairwise

import pytest

from pipeline.sources.timing import FpsLimiter, RateMeter, Timeline


def test_fps_limiter_keeps_the_target_rate_on_an_uneven_source():
    limiter = FpsLimiter(5.0)
    admitted = [i for i in range(125) if limiter.admit(i / 12.5)]  # 10 s of a 12.5 fps camera
    assert len(admitted) == 50
    assert FpsLimiter(None).admit(0.0) and FpsLimiter(30.0).admit(0.0)


def test_timeline_repairs_backwards_and_missing_pts():
    timeline = Timeline()
    raw = [0.0, 0.04, 0.08, 0.06, 0.10, None, 5.0, 0.0, 0.04]
    out = [timeline.next(value, 0.04, wall=i) for i, value in enumerate(raw)]
    assert all(b > a for a, b in pairwise(out))
    timeline.new_segment(use_wall_gap=False)  # a reopened file starts at 0 again
    assert timeline.next(0.0, 0.04, wall=20) == pytest.approx(out[-1] + 0.04)


def test_rate_meter_counts_over_its_window_and_does_not_under_report_at_the_start():
    meter = RateMeter(window_s=5.0)
    assert meter.rate(0.0) == 0.0
    for i in range(10):
        meter.add(100.0 + i * 0.1)  # 10 per second for 1 s
    assert meter.rate(101.0) == pytest.approx(10.0)  # over the 1 s seen so far, not the 5 s window
    assert meter.rate(110.0) == 0.0  # everything left the window
