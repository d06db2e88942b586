"""What the live page shows of one camera: its emotion mix over the last minute and its current tracks.

Built from the camera's events alone, so it works the same whichever ingest replica runs the
camera and whichever emission policy is on. The mix is weighted by time, not by event count:
each event speaks for its track until that track's next event, for at most ``hold_s`` (with
``on_change`` one event can stand for seconds of an unchanged face, with ``every_face`` it stands
for one frame interval). Counting events instead would make a policy change look like a mood change.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import redis

from pipeline.events import ExpressionEvent, stream_key

# A cap on the events read for one summary: ten cameras' worth of faces at 5 fps for a minute.
MAX_EVENTS_READ = 20_000


@dataclasses.dataclass(frozen=True)
class LiveTrack:
    """A track seen within the last ``current_s``: its latest emotion and how sure the model was."""

    track_id: int
    emotion: str
    confidence: float
    age_s: float  # how long ago its latest event was captured
    box: tuple[int, int, int, int]


@dataclasses.dataclass(frozen=True)
class LiveSummary:
    camera_id: str
    window_s: float
    bucket_s: float
    classes: tuple[str, ...]  # the model's classes, in its order: a stable colour per emotion
    mix: dict[str, float]  # each emotion's share of the face-time in the window (sums to 1, or empty)
    buckets: list[dict[str, float]]  # oldest first: face-seconds per emotion in each bucket_s slice
    tracks: list[LiveTrack]
    events: int  # events in the window

    def to_json_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["classes"] = list(self.classes)
        data["tracks"] = [{**dataclasses.asdict(track), "box": list(track.box)} for track in self.tracks]
        return data


def _intervals(events: Sequence[ExpressionEvent], now: float, hold_s: float) -> Iterable[tuple[str, float, float]]:
    """(emotion, start, end) per event: until its track's next event, at most ``hold_s``, never past ``now``."""
    by_track: dict[int, list[ExpressionEvent]] = defaultdict(list)
    for event in events:
        by_track[event.track_id].append(event)
    for track_events in by_track.values():
        track_events.sort(key=lambda event: event.capture_time)
        for event, following in zip(track_events, [*track_events[1:], None], strict=True):
            end = event.capture_time + hold_s
            if following is not None:
                end = min(end, following.capture_time)
            yield event.emotion, event.capture_time, min(end, now)


def summarize(
    camera_id: str,
    events: Sequence[ExpressionEvent],
    now: float,
    *,
    window_s: float = 60.0,
    bucket_s: float = 5.0,
    hold_s: float = 1.0,
    current_s: float = 3.0,
) -> LiveSummary:
    """The summary of the window ``[now - window_s, now]``; ``events`` may hold older ones (they are cut off)."""
    if window_s <= 0 or bucket_s <= 0 or hold_s <= 0 or current_s <= 0:
        raise ValueError("window_s, bucket_s, hold_s and current_s must be > 0")
    start = now - window_s
    count = max(1, round(window_s / bucket_s))
    bucket_s = window_s / count
    buckets: list[dict[str, float]] = [{} for _ in range(count)]
    classes: list[str] = []
    for event in events:
        for name in event.probabilities:
            if name not in classes:
                classes.append(name)
    # After the model's classes: an abstaining event's 'uncertain' (events.abstain_below) names none of them.
    for event in events:
        if event.emotion not in classes:
            classes.append(event.emotion)
    totals: dict[str, float] = defaultdict(float)
    for emotion, begin, end in _intervals(events, now, hold_s):
        begin = max(begin, start)
        if end <= begin:
            continue
        totals[emotion] += end - begin
        # Spread the interval over the buckets it overlaps.
        first = min(count - 1, int((begin - start) // bucket_s))
        for index in range(first, count):
            bucket_start = start + index * bucket_s
            overlap = min(end, bucket_start + bucket_s) - max(begin, bucket_start)
            if overlap <= 0:
                break
            buckets[index][emotion] = buckets[index].get(emotion, 0.0) + overlap
    face_time = sum(totals.values())
    mix = {emotion: seconds / face_time for emotion, seconds in totals.items()} if face_time > 0 else {}
    in_window = [event for event in events if start <= event.capture_time <= now]
    return LiveSummary(
        camera_id=camera_id,
        window_s=window_s,
        bucket_s=bucket_s,
        classes=tuple(classes),
        mix=dict(sorted(mix.items(), key=lambda item: -item[1])),
        buckets=buckets,
        tracks=current_tracks(in_window, now, current_s),
        events=len(in_window),
    )


def current_tracks(events: Iterable[ExpressionEvent], now: float, current_s: float) -> list[LiveTrack]:
    """Each track's latest event, for the tracks seen within ``current_s``; by track id."""
    latest: dict[int, ExpressionEvent] = {}
    for event in events:
        known = latest.get(event.track_id)
        if known is None or event.capture_time >= known.capture_time:
            latest[event.track_id] = event
    return [
        LiveTrack(event.track_id, event.emotion, event.confidence, max(0.0, now - event.capture_time), event.box)
        for track_id, event in sorted(latest.items())
        if now - event.capture_time <= current_s
    ]


def recent_events(
    client: redis.Redis, prefix: str, camera_id: str, since: float, max_events: int = MAX_EVENTS_READ
) -> list[ExpressionEvent]:
    """The camera's events published since ``since`` (unix seconds), oldest first, at most the newest ``max_events``.

    Stream ids start with the publish time in milliseconds, so the range is cut by the id and
    Redis reads only the tail of the stream. Entries that do not decode are skipped.
    """
    entries = client.xrevrange(stream_key(prefix, camera_id), max="+", min=str(max(0, int(since * 1000))), count=max_events)
    events = []
    for _message_id, fields in reversed(entries):
        try:
            events.append(ExpressionEvent.from_fields(fields))
        except ValueError:
            continue
    return events


class LiveSummaries:
    """Summaries read from the events in Redis, with the window the page shows."""

    def __init__(self, client: redis.Redis, prefix: str, *, hold_s: float, window_s: float = 60.0, bucket_s: float = 5.0) -> None:
        self.client = client
        self.prefix = prefix
        self.hold_s = hold_s
        self.window_s = window_s
        self.bucket_s = bucket_s

    def summary(self, camera_id: str, now: float) -> LiveSummary:
        # Events published up to hold_s before the window still speak for its first moments.
        events = recent_events(self.client, self.prefix, camera_id, now - self.window_s - self.hold_s)
        return summarize(
            camera_id, events, now, window_s=self.window_s, bucket_s=self.bucket_s, hold_s=self.hold_s, current_s=max(3.0, self.hold_s)
        )
