"""Per-track summaries over a sliding window, with an injected clock."""

import io
import json

import pytest

from pipeline.summary import RunTotals, SummarizingWriter, SummaryPrinter, TrackSummary


def event(track_id: int, emotion: str, camera_id: str = "door", confidence: float = 0.7) -> dict:
    return {"camera_id": camera_id, "track_id": track_id, "emotion": emotion, "confidence": confidence}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_track_line_gives_its_current_emotion_and_that_emotions_share_of_the_window():
    summary = TrackSummary(window_s=5)
    for at, emotion in [(0.0, "sad"), (1.0, "happy"), (2.0, "happy"), (3.0, "neutral"), (4.0, "happy")]:
        summary.add(event(7, emotion, confidence=at / 10), at)
    [line] = summary.lines(now=4.5)
    assert (line.camera_id, line.track_id, line.emotion, line.events) == ("door", 7, "happy", 5)
    assert line.share == pytest.approx(3 / 5)
    assert line.confidence == pytest.approx(0.4)
    assert line.format(5) == "camera door track 7: happy (0.40), 60% of its 5 events in the last 5 s"


def test_events_older_than_the_window_no_longer_count_and_gone_tracks_drop_out():
    summary = TrackSummary(window_s=5)
    summary.add(event(1, "sad"), 0.0)
    summary.add(event(1, "sad"), 1.0)
    summary.add(event(1, "happy"), 6.0)
    summary.add(event(2, "angry"), 6.5)
    lines = summary.lines(now=6.5)
    assert [(line.track_id, line.emotion, line.share, line.events) for line in lines] == [(1, "happy", 1.0, 1), (2, "angry", 1.0, 1)]
    assert summary.lines(now=12.0) == []
    # The totals keep everything seen.
    assert summary.events_total == 4 and summary.tracks_total == {("door", 1), ("door", 2)}


def test_tracks_of_different_cameras_are_apart_and_ordered_by_camera_then_track():
    summary = TrackSummary(window_s=5)
    for camera_id, track_id in [("b", 2), ("a", 9), ("b", 1), ("a", 9)]:
        summary.add(event(track_id, "neutral", camera_id), 0.0)
    assert [(line.camera_id, line.track_id, line.events) for line in summary.lines(1.0)] == [("a", 9, 2), ("b", 1, 1), ("b", 2, 1)]


def test_the_window_must_be_positive():
    with pytest.raises(ValueError):
        TrackSummary(window_s=0)


def test_the_printer_reports_every_interval_and_says_so_when_nobody_is_in_view():
    clock, out = Clock(), io.StringIO()
    printer = SummaryPrinter(5, out, clock)
    printer.observe(event(3, "happy"))
    clock.now += 4.9
    assert not printer.report_if_due() and out.getvalue() == ""
    clock.now += 0.2
    assert printer.report_if_due()
    assert out.getvalue() == "summary: camera door track 3: happy (0.70), 100% of its 1 events in the last 5 s\n"
    assert not printer.report_if_due()  # not again until the next interval
    clock.now += 5.1
    assert printer.report_if_due()
    assert out.getvalue().endswith("summary: no faces in the last 5 s\n")


def test_the_writer_passes_tail_lines_through_and_feeds_the_printer_whole_lines_only():
    clock, out, report = Clock(), io.StringIO(), io.StringIO()
    writer = SummarizingWriter(out, SummaryPrinter(5, report, clock))
    line = json.dumps(event(4, "surprise"))
    writer.write(line[:10])
    writer.write(line[10:] + "\n" + json.dumps(event(5, "fear")) + "\n")
    assert out.getvalue() == line + "\n" + json.dumps(event(5, "fear")) + "\n"
    clock.now += 5
    writer.flush()
    assert [text.split(":")[1].strip() for text in report.getvalue().splitlines()] == ["camera door track 4", "camera door track 5"]


def test_run_totals_read_as_one_line():
    totals = RunTotals(
        frames_decoded=300, frames_processed=60, frames_dropped=240, faces=120, events_published=118, events_lost=2, tracks=5
    )
    assert totals.format() == "300 frames decoded, 60 processed, 240 dropped; 120 faces; 118 events delivered, 2 lost; 5 tracks"
