"""What a person watching the events wants to know: who is on camera and how they look, lately.

``TrackSummary`` keeps the events of the last ``window_s`` seconds and turns them into one line
per track: its current emotion and that emotion's share of the track's events in the window.
``SummaryPrinter`` writes those lines every ``interval_s`` seconds. Both work on the events'
JSON form (``ExpressionEvent.to_json_dict``, or a line of ``ferstream tail``), so the runner
and ``tail`` share them. No Ray, no Redis: clocks are injected and tests drive them.
"""

from __future__ import annotations

import io
import json
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TextIO


@dataclass(frozen=True)
class TrackLine:
    camera_id: str
    track_id: int
    emotion: str  # the track's latest emotion
    share: float  # fraction of the track's events in the window that carry ``emotion``
    confidence: float  # the latest event's confidence
    events: int  # the track's events in the window

    def format(self, window_s: float) -> str:
        return (
            f"camera {self.camera_id} track {self.track_id}: {self.emotion} ({self.confidence:.2f}), "
            f"{self.share:.0%} of its {self.events} events in the last {window_s:g} s"
        )


@dataclass(frozen=True)
class _Seen:
    at: float
    camera_id: str
    track_id: int
    emotion: str
    confidence: float


class TrackSummary:
    """Per-track emotion shares over a sliding window of ``window_s`` seconds."""

    def __init__(self, window_s: float) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be positive")
        self.window_s = window_s
        self._window: deque[_Seen] = deque()
        self.events_total = 0
        self.tracks_total: set[tuple[str, int]] = set()

    def add(self, event: Mapping[str, Any], at: float) -> None:
        seen = _Seen(at, str(event["camera_id"]), int(event["track_id"]), str(event["emotion"]), float(event["confidence"]))
        self._window.append(seen)
        self.events_total += 1
        self.tracks_total.add((seen.camera_id, seen.track_id))

    def lines(self, now: float, since: float | None = None) -> list[TrackLine]:
        """One line per track with events in the last ``window_s`` seconds (or from ``since`` on), by camera then track."""
        start = now - self.window_s if since is None else since
        while self._window and self._window[0].at < start:
            self._window.popleft()
        emotions: dict[tuple[str, int], Counter[str]] = {}
        latest: dict[tuple[str, int], _Seen] = {}
        for seen in self._window:
            key = (seen.camera_id, seen.track_id)
            emotions.setdefault(key, Counter())[seen.emotion] += 1
            latest[key] = seen
        lines = []
        for key in sorted(latest):
            last = latest[key]
            count = sum(emotions[key].values())
            share = emotions[key][last.emotion] / count
            lines.append(TrackLine(last.camera_id, last.track_id, last.emotion, share, last.confidence, count))
        return lines


class SummaryPrinter:
    """Feeds events to a ``TrackSummary`` and writes its lines to ``out`` every ``interval_s`` seconds.

    Each report covers the events since the previous one, so consecutive reports neither overlap
    nor leave gaps. The first report comes ``interval_s`` after the printer was made.
    """

    def __init__(self, interval_s: float, out: TextIO, clock: Callable[[], float] = time.monotonic, prefix: str = "summary") -> None:
        self.summary = TrackSummary(interval_s)
        self.interval_s = interval_s
        self.out = out
        self.prefix = prefix
        self._clock = clock
        self._last_report = clock()

    def observe(self, event: Mapping[str, Any]) -> None:
        self.summary.add(event, self._clock())

    def report_if_due(self) -> bool:
        """Write the lines when ``interval_s`` has passed since the last report; True when it wrote."""
        now = self._clock()
        if now < self._last_report + self.interval_s:
            return False
        # From the last report on, not a fixed window back: reports come a little late (on the next
        # frame or read), and a fixed window would then lose the events just after the last one.
        lines = self.summary.lines(now, since=self._last_report)
        self._last_report = now
        if not lines:
            self.out.write(f"{self.prefix}: no faces in the last {self.interval_s:g} s\n")
        for line in lines:
            self.out.write(f"{self.prefix}: {line.format(self.interval_s)}\n")
        self.out.flush()
        return True


class SummarizingWriter(io.TextIOBase):
    """A text stream for ``pipeline.events.tail``: passes the JSON lines through to ``out`` and
    shows each event to ``printer``, which reports when due (``tail`` flushes after every read)."""

    def __init__(self, out: TextIO, printer: SummaryPrinter) -> None:
        super().__init__()
        self.out = out
        self.printer = printer
        self._partial = ""

    def write(self, text: str) -> int:
        self.out.write(text)
        *complete, self._partial = (self._partial + text).split("\n")
        for line in complete:
            if line.strip():
                self.printer.observe(json.loads(line))
        return len(text)

    def flush(self) -> None:
        self.out.flush()
        self.printer.report_if_due()


@dataclass(frozen=True)
class RunTotals:
    """The closing line of a run: what went in, what came out, what was lost."""

    frames_decoded: int
    frames_processed: int
    frames_dropped: int
    faces: int
    events_published: int
    events_lost: int
    tracks: int

    def format(self) -> str:
        return (
            f"{self.frames_decoded} frames decoded, {self.frames_processed} processed, {self.frames_dropped} dropped; "
            f"{self.faces} faces; {self.events_published} events delivered, {self.events_lost} lost; {self.tracks} tracks"
        )
