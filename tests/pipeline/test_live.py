from __future__ import annotations

import json

import pytest
import redis

from pipeline.events import stream_key
from pipeline.live import LiveSummaries, current_tracks, recent_events, summarize
from tests.pipeline.events.helpers import make_event

NOW = 1_700_000_100.0


def event(t: float, track: int = 1, emotion: str = "happy", confidence: float = 0.8):
    return make_event(capture_time=NOW + t, track_id=track, emotion=emotion, confidence=confidence)


def test_the_mix_weighs_each_event_by_the_time_until_its_tracks_next_event():
    # One face, 5 fps for 10 s: happy for the first 6 s, sad for the last 4 s.
    events = [event(-10 + i * 0.2, emotion="happy" if i < 30 else "sad") for i in range(50)]
    summary = summarize("cam1", events, NOW, window_s=60, bucket_s=5, hold_s=1.0)
    assert summary.mix == pytest.approx({"happy": 0.6, "sad": 0.4}, abs=0.01)
    assert list(summary.mix) == ["happy", "sad"]  # largest share first
    assert summary.events == 50
    assert len(summary.buckets) == 12
    assert summary.buckets[:10] == [{}] * 10
    # -10..-5: happy only; -5..0: 1 s happy, then 4 s sad (the last event holds until now).
    assert summary.buckets[10] == pytest.approx({"happy": 5.0})
    assert summary.buckets[11] == pytest.approx({"happy": 1.0, "sad": 4.0})


def test_a_policy_that_emits_less_often_gives_the_same_mix():
    every_face = [event(-20 + i * 0.2, emotion="happy" if i < 50 else "neutral") for i in range(100)]
    # on_change: the change points plus a heartbeat every 5 s.
    on_change = [event(-20, emotion="happy"), event(-15, emotion="happy"), event(-10, emotion="neutral"), event(-5, emotion="neutral")]
    dense = summarize("cam1", every_face, NOW, hold_s=1.0)
    sparse = summarize("cam1", on_change, NOW, hold_s=6.0)
    assert dense.mix == pytest.approx(sparse.mix, abs=0.02)
    assert dense.mix == pytest.approx({"happy": 0.5, "neutral": 0.5}, abs=0.02)


def test_an_event_speaks_for_at_most_hold_s_and_gaps_count_for_nothing():
    events = [event(-30, emotion="sad"), event(-10, emotion="happy")]
    summary = summarize("cam1", events, NOW, hold_s=2.0)
    face_seconds = sum(sum(bucket.values()) for bucket in summary.buckets)
    assert face_seconds == pytest.approx(4.0)
    assert summary.mix == pytest.approx({"sad": 0.5, "happy": 0.5})


def test_events_before_the_window_only_count_for_their_part_inside_it():
    events = [event(-61.0, emotion="sad"), event(-70, emotion="angry")]
    summary = summarize("cam1", events, NOW, window_s=60, hold_s=2.0)
    assert summary.mix == {"sad": 1.0}
    assert summary.buckets[0] == pytest.approx({"sad": 1.0})
    assert summary.events == 0 and summary.tracks == []


def test_uncertain_events_are_charted_after_the_models_classes():
    # events.abstain_below: 'uncertain' is no key of the probabilities, but its face-time is drawn like a class's.
    events = [event(-4, emotion="happy"), event(-2, emotion="uncertain", confidence=0.3)]
    summary = summarize("cam1", events, NOW, hold_s=2.0)
    assert summary.classes == ("happy", "neutral", "sad", "uncertain")
    assert summary.mix == pytest.approx({"happy": 0.5, "uncertain": 0.5})
    assert summary.buckets[-1] == pytest.approx({"happy": 2.0, "uncertain": 2.0})


def test_two_tracks_add_up_and_the_classes_keep_the_models_order():
    events = [event(-4 + i * 0.5, track=track) for i in range(8) for track in (1, 2)]
    summary = summarize("cam1", events, NOW, hold_s=1.0)
    assert summary.mix == {"happy": 1.0}
    assert sum(summary.buckets[-1].values()) == pytest.approx(8.0)  # two faces for 4 s
    assert summary.classes == ("happy", "neutral", "sad")


def test_no_events_give_an_empty_summary():
    summary = summarize("cam1", [], NOW)
    assert summary.mix == {} and summary.tracks == [] and summary.events == 0
    assert summary.buckets == [{}] * 12


def test_bad_windows_are_refused():
    with pytest.raises(ValueError, match="must be > 0"):
        summarize("cam1", [], NOW, window_s=0)


def test_current_tracks_are_the_latest_event_of_each_recent_track():
    events = [
        event(-10, track=1, emotion="sad"),  # gone
        event(-2.5, track=2, emotion="sad", confidence=0.4),
        event(-0.5, track=2, emotion="happy", confidence=0.9),
        event(-1.0, track=3, emotion="neutral", confidence=0.7),
    ]
    tracks = current_tracks(events, NOW, current_s=3.0)
    assert [(t.track_id, t.emotion, t.confidence) for t in tracks] == [(2, "happy", 0.9), (3, "neutral", 0.7)]
    assert tracks[0].age_s == pytest.approx(0.5)
    assert tracks[0].box == (10, 20, 110, 140)


def test_the_summary_is_plain_json():
    summary = summarize("cam1", [event(-1.0)], NOW)
    data = json.loads(json.dumps(summary.to_json_dict()))
    assert data["camera_id"] == "cam1"
    assert data["tracks"] == [{"track_id": 1, "emotion": "happy", "confidence": 0.8, "age_s": 1.0, "box": [10, 20, 110, 140]}]
    assert data["classes"] == ["happy", "neutral", "sad"]


@pytest.mark.integration
def test_recent_events_read_only_the_tail_of_a_real_stream(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    key = stream_key("test", "cam1")
    for index, published_ms in enumerate((1_000_000, 2_000_000, 3_000_000)):
        client.xadd(key, make_event(frame_index=index).to_fields(), id=f"{published_ms}-0")
    client.xadd(key, {"schema_version": "1", "garbage": "x"}, id="3000001-0")
    assert [e.frame_index for e in recent_events(client, "test", "cam1", since=2_000.0)] == [1, 2]
    assert [e.frame_index for e in recent_events(client, "test", "cam1", since=0, max_events=2)] == [2]  # newest 2, one bad
    assert recent_events(client, "test", "nope", since=0) == []


@pytest.mark.integration
def test_live_summaries_come_from_the_events_in_redis(redis_server):
    client = redis.Redis.from_url(redis_server.url)
    now = 1_700_000_100.0
    for i in range(10):
        capture = now - 2 + i * 0.2
        client.xadd(stream_key("test", "cam1"), make_event(capture_time=capture, frame_index=i).to_fields(), id=f"{int(capture * 1000)}-0")
    summary = LiveSummaries(client, "test", hold_s=1.0).summary("cam1", now)
    assert summary.events == 10 and summary.mix == {"happy": 1.0}
    assert [track.track_id for track in summary.tracks] == [3]
