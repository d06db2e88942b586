"""The generic camera with a scripted reader (no PyAV): state machine, reconnects, watchdog, fps limit, slot.

The same camera with the PyAV reader on real clips and servers is in test_pyav_reader.py."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Sequence
from itertools import pairwise
from typing import Any

import pytest

from pipeline.config import SourceConfig
from pipeline.frames import StreamState, VideoFrame
from pipeline.metrics import PipelineMetrics
from pipeline.sources.camera import CameraSource
from pipeline.sources.reader import ReadIssue
from tests.pipeline.sources.helpers import assert_accounted, drain, make_config, sample, source_threads, wait_until
from tests.pipeline.sources.synthetic_reader import Break, Connection, Crash, Frame, NoFrame, SyntheticReader, frames, marker_of

FILE = "/videos/clip.mp4"
LIVE = "rtsp://admin:hunter2@cam.local/live"


@pytest.fixture
def start(metrics: PipelineMetrics, sources: list[CameraSource]) -> Any:
    def _start(config: SourceConfig, *connections: Connection, clock: Any = time.time) -> tuple[CameraSource, SyntheticReader]:
        reader = SyntheticReader(connections)
        source = CameraSource(config, metrics, reader=reader, clock=clock, rng=random.Random(7))
        sources.append(source)
        source.start()
        return source, reader

    return _start


def live_config(**overrides: Any) -> SourceConfig:
    return make_config(LIVE, realtime=True, **overrides)


def read_frames(source: CameraSource, count: int, timeout_s: float = 10.0) -> list[VideoFrame]:
    received: list[VideoFrame] = []
    deadline = time.monotonic() + timeout_s
    while len(received) < count:
        assert time.monotonic() < deadline, source.status()
        frame = source.read(timeout=0.5)
        if frame is not None:
            received.append(frame)
    return received


def transitions(records: Sequence[logging.LogRecord]) -> list[str]:
    return [r.getMessage().removeprefix("camera cam: ") for r in records if " -> " in r.getMessage()]


def test_a_file_plays_to_its_end_with_index_pts_capture_time_and_bgr_image(metrics, start):
    source, reader = start(make_config(FILE), Connection(frames(6, size=(10, 4))), clock=lambda: 1234.5)
    received = drain(source)
    assert [marker_of(f.image) for f in received] == list(range(6))
    assert [f.frame_index for f in received] == list(range(6))
    assert [f.pts_s for f in received] == pytest.approx([i / 25 for i in range(6)])
    assert all(f.camera_id == "cam" and f.capture_time == 1234.5 and f.image.shape == (4, 10, 3) for f in received)
    status = source.status()
    assert status.state == StreamState.ENDED and source.finished
    assert status.frames_decoded == 6 and status.frames_dropped == 0 and status.reconnects == 0 and status.last_error is None
    assert reader.opens == reader.closes == 1
    assert sample(metrics, "stream_up") == 0
    assert_accounted(source, metrics)


def test_open_failures_back_off_then_fail_after_max_reconnects_with_the_url_redacted(metrics, start, caplog):
    caplog.set_level(logging.INFO, logger="ferstream.sources")
    refused = Connection(open_error="Connection refused")
    source, reader = start(live_config(max_reconnects=2), refused, refused, refused)
    wait_until(lambda: source.finished, what="FAILED")
    status = source.status()
    assert status.state == StreamState.FAILED and status.reconnects == 2
    assert status.last_error == "open: cannot open rtsp://admin:***@cam.local/live: Connection refused"
    assert sample(metrics, "decode_errors_total", kind="open") == 3 and sample(metrics, "reconnects_total") == 2
    assert reader.opens == 3 and reader.closes == 0  # nothing was opened, nothing to close
    assert transitions(caplog.records) == [
        "connecting -> reconnecting",
        "reconnecting -> connecting",
        "connecting -> reconnecting",
        "reconnecting -> connecting",
        "connecting -> failed",
    ]
    assert not any("hunter2" in r.getMessage() for r in caplog.records)


def test_a_file_that_cannot_be_opened_fails_without_retrying(metrics, start):
    source, reader = start(make_config(FILE), Connection(open_error="No such file or directory"))
    wait_until(lambda: source.finished, what="FAILED")
    assert source.status().state == StreamState.FAILED and source.status().reconnects == 0 and reader.opens == 1


def test_a_broken_stream_reconnects_and_frames_flowing_again_reset_the_failure_count(metrics, start):
    first = Connection([*frames(10), Break("stall", "no data for 1s")])
    second = Connection(frames(10))  # PTS start at 0 again, as after a real reconnect
    # Broken (1 failure), streams again (count reset), server ends it (1), two refused opens (2, then give up).
    source, reader = start(live_config(max_reconnects=2), first, second)
    received = drain(source)
    status = source.status()
    assert status.state == StreamState.FAILED and status.reconnects == 3  # without the reset: FAILED after 2
    assert status.frames_decoded == 20 and sample(metrics, "decode_errors_total", kind="stall") == 1
    assert received and all(b.frame_index > a.frame_index and b.pts_s > a.pts_s for a, b in pairwise(received))
    assert reader.closes == 2 and reader.opens == 4
    assert_accounted(source, metrics)


def test_the_watchdog_reconnects_input_that_brings_no_frame(metrics, start):
    stalled = Connection([*frames(2), NoFrame(seconds=5.0)])
    source, reader = start(live_config(watchdog_timeout_s=0.2, max_reconnects=0), stalled)
    began = time.monotonic()
    assert len(drain(source, timeout_s=5.0)) <= 2
    assert time.monotonic() - began < 2.0  # cut off by the watchdog, not at the end of the 5 s
    assert source.status().state == StreamState.FAILED
    assert sample(metrics, "decode_errors_total", kind="stall") == 1
    assert "no decodable frame from rtsp://admin:***@cam.local/live for 0.2s" in (source.status().last_error or "")
    assert reader.closes == 1


def test_a_pause_shorter_than_the_watchdog_is_not_a_stall(metrics, start):
    source, _reader = start(make_config(FILE, watchdog_timeout_s=1.0), Connection([*frames(2), NoFrame(0.2), *frames(2, first=2)]))
    assert [marker_of(f.image) for f in drain(source)] == [0, 1, 2, 3]
    assert source.status().state == StreamState.ENDED and sample(metrics, "decode_errors_total", kind="stall") == 0


def test_read_issues_are_counted_and_reading_goes_on(metrics, start):
    steps = [*frames(3), ReadIssue("decode", "decode error on /videos/clip.mp4: Invalid data"), NoFrame(), *frames(3, first=3)]
    source, _reader = start(make_config(FILE), Connection(steps))
    assert [marker_of(f.image) for f in drain(source)] == list(range(6))
    assert sample(metrics, "decode_errors_total", kind="decode") == 1
    assert source.status().last_error == "decode: decode error on /videos/clip.mp4: Invalid data"
    assert source.status().state == StreamState.ENDED


def test_the_fps_limit_admits_by_pts_and_converts_only_admitted_frames(metrics, start):
    source, reader = start(make_config(FILE, target_fps=5), Connection(frames(50)))
    received = drain(source)
    assert [marker_of(f.image) for f in received] == list(range(0, 50, 5))
    assert [f.frame_index for f in received] == list(range(0, 50, 5))
    assert sample(metrics, "frames_dropped_total", reason="fps_limit") == 40
    assert reader.conversions == 10
    assert_accounted(source, metrics)


def test_frames_above_max_frame_pixels_are_dropped_before_conversion(metrics, start):
    source, reader = start(make_config(FILE, max_frame_pixels=99), Connection(frames(3, size=(10, 10))))
    assert drain(source) == []
    assert sample(metrics, "frames_dropped_total", reason="too_large") == 3 and reader.conversions == 0
    assert "10x10 frame above max_frame_pixels (99)" in (source.status().last_error or "")


def test_missing_pts_and_rate_still_give_increasing_pts(start):
    steps = [Frame(marker, None) for marker in range(5)]
    source, _reader = start(make_config(FILE), Connection(steps, frame_interval_s=None))
    received = drain(source)
    assert len(received) == 5 and all(b.pts_s > a.pts_s for a, b in pairwise(received))


def test_loop_reopens_the_file_and_the_timeline_continues(metrics, start):
    source, reader = start(make_config(FILE, loop=True), Connection(frames(4)), Connection(frames(4)), Connection(frames(4)))
    received = read_frames(source, 8)
    assert [marker_of(f.image) for f in received] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert [f.pts_s for f in received] == pytest.approx([i / 25 for i in range(8)])
    assert sample(metrics, "reconnects_total") == 0  # a loop is not a reconnect
    source.stop()
    assert source.status().state == StreamState.STOPPED and reader.closes == reader.opens


@pytest.mark.parametrize("loop", [False, True])
def test_a_file_without_frames_fails_counted_instead_of_ending_or_spinning(metrics, start, loop):
    source, reader = start(make_config(FILE, loop=loop), Connection([NoFrame()]), Connection(frames(1)))
    wait_until(lambda: source.finished, what="FAILED")
    assert source.status().state == StreamState.FAILED and reader.opens == 1
    assert "ended without a decodable frame" in (source.status().last_error or "")
    assert sample(metrics, "decode_errors_total", kind="decode") == 1


def test_a_slow_consumer_gets_the_freshest_frame_of_a_live_stream(metrics, start):
    source, _reader = start(live_config(), Connection([*frames(30), NoFrame(5.0)]))
    # The 29th replacement is frame 29 taking frame 28's place in the slot.
    wait_until(lambda: sample(metrics, "frames_dropped_total", reason="stale") == 29, what="29 frames replaced unread")
    frame = source.read(timeout=1.0)
    assert frame is not None and marker_of(frame.image) == 29  # the older 29 were replaced unread
    assert sample(metrics, "frames_dropped_total", reason="stale") == 29
    assert source.read(timeout=0.05) is None  # nothing newer yet
    source.stop()
    assert_accounted(source, metrics)


def test_a_bug_in_the_reader_fails_the_camera_instead_of_leaving_read_waiting(start, caplog):
    caplog.set_level(logging.ERROR, logger="ferstream.sources")
    source, reader = start(live_config(), Connection([*frames(1), Crash("bug")]))
    drain(source, timeout_s=5.0)
    status = source.status()
    assert status.state == StreamState.FAILED and status.last_error == "internal error (see log)"
    assert reader.closes == 1  # the stream was closed on the way out
    assert any("decode thread crashed" in r.getMessage() for r in caplog.records)


def test_stop_ends_the_stream_between_items_and_closes_it(start):
    source, reader = start(live_config(watchdog_timeout_s=60.0), Connection([*frames(1), NoFrame(30.0)]))
    wait_until(lambda: source.status().state == StreamState.STREAMING, what="streaming")
    began = time.monotonic()
    source.stop()
    assert time.monotonic() - began < 1.0
    assert source.finished and source.status().state == StreamState.STOPPED
    assert reader.closes == 1 and not source_threads()
