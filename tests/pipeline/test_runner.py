"""The single-process pipeline end to end: real clips, real MTCNN, the shipped model, a real redis-server."""

from collections import Counter

import pytest
import redis

from pipeline.classification import ExpressionClassifier
from pipeline.config import PipelineConfig, parse_config
from pipeline.detection import build_detector
from pipeline.events import EventPublisher, ExpressionEvent, stream_key, validate_event_dict
from pipeline.metrics import PipelineMetrics
from pipeline.runner import ModelStages, StreamPipeline

PEOPLE = {"head-pose-face-detection-female-and-male": 2, "face-demographics-walking-and-pause": 3}


@pytest.fixture(scope="module")
def models() -> ModelStages:
    config = PipelineConfig()
    return ModelStages(build_detector(config.detector), ExpressionClassifier(config.classifier), config.detector.detection_size)


def make_pipeline(models: ModelStages, redis_url: str, cameras: list[dict]) -> tuple[StreamPipeline, PipelineMetrics]:
    config = parse_config(PipelineConfig, {"cameras": cameras, "events": {"redis_url": redis_url}}, "test")
    metrics = PipelineMetrics()
    pipeline = StreamPipeline(config, metrics, models, EventPublisher(config.events, metrics))
    for camera in config.cameras:
        pipeline.add_camera(camera)
    return pipeline, metrics


def read_events(redis_url: str, camera_id: str) -> list[ExpressionEvent]:
    client = redis.Redis.from_url(redis_url)
    return [ExpressionEvent.from_fields(fields) for _id, fields in client.xrange(stream_key("ferstream", camera_id))]


def test_shared_clips_produce_valid_events_with_stable_tracks(models, redis_server, shared_clips):
    cameras = [{"camera_id": name.split("-")[0], "url": str(shared_clips[name]), "realtime": False, "target_fps": None} for name in PEOPLE]
    pipeline, metrics = make_pipeline(models, redis_server.url, cameras)
    try:
        pipeline.run(max_seconds=120)
    finally:
        pipeline.close()

    for name, people in PEOPLE.items():
        camera_id = name.split("-")[0]
        events = read_events(redis_server.url, camera_id)
        frames = Counter(event.frame_index for event in events)
        decoded = metrics.registry.get_sample_value("ferstream_frames_decoded_total", {"camera": camera_id})
        assert decoded and len(frames) >= 0.9 * decoded, f"{camera_id}: events for {len(frames)} of {decoded} frames"
        full_frames = sum(count == people for count in frames.values())
        assert full_frames >= 0.8 * len(frames), f"{camera_id}: {people} faces in only {full_frames}/{len(frames)} frames"
        for event in events[:20]:
            validate_event_dict(event.to_json_dict())
        # Stable tracks: the people stay in view, so a handful of long tracks carry nearly all events.
        tracks = Counter(event.track_id for event in events)
        main_tracks = tracks.most_common(people)
        assert sum(count for _track, count in main_tracks) >= 0.9 * len(events), f"{camera_id}: fragmented tracks {tracks}"
        assert all(count >= 0.8 * len(frames) for _track, count in main_tracks), f"{camera_id}: tracks {tracks}"
        assert metrics.registry.get_sample_value("ferstream_events_published_total", {"camera": camera_id}) == len(events)
        assert metrics.registry.get_sample_value("ferstream_faces_detected_total", {"camera": camera_id}) >= len(events)


def test_a_broken_camera_does_not_stop_a_good_one(models, redis_server, shared_clips, tmp_path):
    bad_file = tmp_path / "missing.mp4"
    cameras = [
        {"camera_id": "good", "url": str(shared_clips["face-demographics-walking-and-pause"]), "realtime": False, "target_fps": None},
        {"camera_id": "missing", "url": str(bad_file)},
        {"camera_id": "unreachable", "url": "rtsp://127.0.0.1:9/none", "reconnect": {"initial_s": 0.05, "max_s": 0.1}, "max_reconnects": 2},
    ]
    pipeline, metrics = make_pipeline(models, redis_server.url, cameras)
    try:
        pipeline.run(max_seconds=120)
    finally:
        pipeline.close()
    assert len(read_events(redis_server.url, "good")) >= 3 * 30
    assert read_events(redis_server.url, "missing") == []
    assert metrics.registry.get_sample_value("ferstream_decode_errors_total", {"camera": "missing", "kind": "open"}) >= 1
    assert metrics.registry.get_sample_value("ferstream_reconnects_total", {"camera": "unreachable"}) >= 1
