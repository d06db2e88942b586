"""The path after the models: events built from tracks, the track metrics, policy bookkeeping and camera removal."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.analysis import CameraAnalyzer
from pipeline.config import EventsConfig, PriorsConfig, TrackerConfig
from pipeline.detection import FaceDetection
from pipeline.events import EventPublisher, ExpressionEvent, validate_event_dict
from pipeline.frames import VideoFrame
from pipeline.metrics import PipelineMetrics
from pipeline.priors import PriorSettings
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


def test_below_abstain_below_the_event_says_uncertain_and_keeps_its_probabilities() -> None:
    sink, metrics = MemorySink(), PipelineMetrics()
    publisher = EventPublisher(EventsConfig(abstain_below=0.5), metrics, sink)
    tracker = TrackerConfig(max_missed_frames=0, ema_alpha=0.5)
    analyzer = CameraAnalyzer("cam1", tracker, CLASSES, "unit@1", publisher, metrics, abstain_below=0.5)
    face = FaceDetection(box=(0.0, 0.0, 50.0, 50.0), score=0.99)
    analyzer.analyze(frame(0), [face], np.array([[0.9, 0.05, 0.05]], np.float32))
    # Smoothed: 0.5 * (0.1, 0.1, 0.8) + 0.5 * (0.9, 0.05, 0.05) = (0.5, 0.075, 0.425): 0.5 is not below 0.5.
    analyzer.analyze(frame(1), [face], np.array([[0.1, 0.1, 0.8]], np.float32))
    # 0.5 * (0.1, 0.8, 0.1) + 0.5 * (0.5, 0.075, 0.425) = (0.3, 0.4375, 0.2625): the top, 0.4375, is below 0.5.
    analyzer.analyze(frame(2), [face], np.array([[0.1, 0.8, 0.1]], np.float32))
    assert [e.emotion for e in sink.written] == ["happy", "happy", "uncertain"]
    uncertain = sink.written[2]
    assert uncertain.confidence == pytest.approx(0.4375)  # still the top probability, below the threshold
    assert uncertain.probabilities == pytest.approx({"happy": 0.3, "neutral": 0.4375, "sad": 0.2625})
    validate_event_dict(uncertain.to_json_dict())  # a version-3 event, valid against the schema
    decoded = ExpressionEvent.from_fields(uncertain.to_fields())
    assert decoded.emotion == "uncertain" and decoded.schema_version == 3
    assert sample(metrics, "ferstream_classifications_total", {"camera": "cam1", "emotion": "uncertain"}) == 1
    publisher.close()


def test_abstaining_refuses_a_model_with_a_class_named_uncertain() -> None:
    _analyzer, _sink, metrics, publisher = make_analyzer()
    with pytest.raises(ValueError, match="events.abstain_below"):
        CameraAnalyzer("cam1", TrackerConfig(), ("happy", "uncertain"), "unit@1", publisher, metrics, abstain_below=0.4)
    publisher.close()


def test_the_deployment_prior_applies_before_the_tracker_smooths() -> None:
    sink, metrics = MemorySink(), PipelineMetrics()
    publisher = EventPublisher(EventsConfig(), metrics, sink)
    # A camera that sees neutral four times as often as training did: ratio (1, 4, 1) over a uniform training prior.
    priors = PriorSettings.from_config(
        PriorsConfig(train_prior={"happy": 1, "neutral": 1, "sad": 1}, deployment_prior={"happy": 1, "neutral": 4, "sad": 1}), CLASSES
    )
    tracker = TrackerConfig(max_missed_frames=0, ema_alpha=0.5)
    analyzer = CameraAnalyzer("cam1", tracker, CLASSES, "unit@1", publisher, metrics, priors=priors)
    face = FaceDetection(box=(0.0, 0.0, 50.0, 50.0), score=0.99)
    # (0.1, 0.3, 0.6) * (1, 4, 1) = (0.1, 1.2, 0.6), sum 1.9: neutral 12/19 instead of sad 0.6.
    analyzer.analyze(frame(0), [face], np.array([[0.1, 0.3, 0.6]], np.float32))
    first = sink.written[0]
    assert first.emotion == "neutral" and first.confidence == pytest.approx(12 / 19)
    assert first.probabilities == pytest.approx({"happy": 1 / 19, "neutral": 12 / 19, "sad": 6 / 19})
    # (0.5, 0.1, 0.4) * (1, 4, 1) = (0.5, 0.4, 0.4) / 1.3; smoothed with the first adjusted row, half and half.
    analyzer.analyze(frame(1), [face], np.array([[0.5, 0.1, 0.4]], np.float32))
    expected = 0.5 * np.array([0.5, 0.4, 0.4]) / 1.3 + 0.5 * np.array([1, 12, 6]) / 19
    assert [sink.written[1].probabilities[name] for name in CLASSES] == pytest.approx(expected.tolist(), rel=1e-6)
    publisher.close()
