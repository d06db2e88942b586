"""The path after the models: events built from tracks, the track metrics, policy bookkeeping and camera removal."""

from __future__ import annotations

import numpy as np

from pipeline.analysis import CameraAnalyzer
from pipeline.config import EventsConfig, TrackerConfig
from pipeline.detection import FaceDetection
from pipeline.events import EventPublisher
from pipeline.frames import VideoFrame
from pipeline.metrics import PipelineMetrics
from tests.pipeline.events.helpers import MemorySink, sample

CLASSES = ("happy", "neutral", "sad")


def frame(index: int) -> VideoFrame:
    return VideoFrame(camera_id="cam1", frame_index=index, pts_s=index / 5, capture_time=1_700_000_000.0 + index, image=np.zeros((4, 4, 3)))


def make_analyzer(policy: str = "every_face") -> tuple[CameraAnalyzer, MemorySink, PipelineMetrics, EventPublisher]:
    sink, metrics = MemorySink(), PipelineMetrics()
    publisher = EventPublisher(EventsConfig(policy=policy), metrics, sink)
    analyzer = CameraAnalyzer("cam1", TrackerConfig(max_missed_frames=0, ema_alpha=1.0), CLASSES, "unit@1", publisher, metrics)
    return analyzer, sink, metrics, publisher


def test_a_tracked_face_becomes_a_published_event_with_its_metrics() -> None:
    analyzer, sink, metrics, publisher = make_analyzer()
    face = FaceDetection(box=(10.4, 20.6, 60.0, 80.0), score=0.97)
    published = analyzer.analyze(frame(3), [face], np.array([[0.1, 0.2, 0.7]], np.float32))
    assert published == sink.written and len(published) == 1
    event = published[0]
    assert (event.camera_id, event.frame_index, event.track_id, event.model_id) == ("cam1", 3, 1, "unit@1")
    assert event.box == (10, 21, 60, 80) and event.emotion == "sad" and event.confidence == np.float32(0.7)
    assert event.capture_time == 1_700_000_003.0 and event.probabilities.keys() == set(CLASSES)
    analyzer.analyze(frame(4), [face], np.array([[0.1, 0.8, 0.1]], np.float32))
    assert [e.track_id for e in sink.written] == [1, 1]  # the same face keeps its track
    assert sample(metrics, "ferstream_classifications_total", {"camera": "cam1", "emotion": "sad"}) == 1
    assert sample(metrics, "ferstream_classifications_total", {"camera": "cam1", "emotion": "neutral"}) == 1
    assert sample(metrics, "ferstream_stage_latency_seconds_count", {"stage": "track"}) == 2
    publisher.close()


def test_ended_tracks_and_removed_cameras_leave_no_policy_state() -> None:
    analyzer, _sink, metrics, publisher = make_analyzer("on_change")
    face = FaceDetection(box=(0.0, 0.0, 50.0, 50.0), score=0.99)
    analyzer.analyze(frame(0), [face], np.array([[0.8, 0.1, 0.1]], np.float32))
    assert publisher.policy.tracked("cam1") == 1
    assert analyzer.analyze(frame(1), [], np.zeros((0, 3), np.float32)) == []  # the track ends (max_missed_frames=0)
    assert publisher.policy.tracked("cam1") == 0

    analyzer.analyze(frame(2), [face], np.array([[0.8, 0.1, 0.1]], np.float32))
    metrics.stream_up.labels(camera="cam1").set(1)
    analyzer.close()
    assert publisher.policy.tracked("cam1") == 0
    # Its series are gone with it (the registry no longer names the camera).
    assert metrics.registry.get_sample_value("ferstream_stream_up", {"camera": "cam1"}) is None
    assert metrics.registry.get_sample_value("ferstream_classifications_total", {"camera": "cam1", "emotion": "happy"}) is None
    publisher.close()


def test_every_start_of_a_camera_has_its_own_run_id() -> None:
    first, sink, _metrics, publisher = make_analyzer()
    second = CameraAnalyzer("cam1", TrackerConfig(max_missed_frames=0, ema_alpha=1.0), CLASSES, "unit@1", publisher, PipelineMetrics())
    face = FaceDetection(box=(0.0, 0.0, 50.0, 50.0), score=0.99)
    for analyzer in (first, second):
        analyzer.analyze(frame(0), [face], np.array([[0.8, 0.1, 0.1]], np.float32))
    assert [(e.frame_index, e.track_id) for e in sink.written] == [(0, 1), (0, 1)]
    assert sink.written[0].run_id == first.run_id != second.run_id == sink.written[1].run_id
    publisher.close()
