"""The single-process pipeline: end to end with real clips, real MTCNN, the shipped model and a real redis-server;
failure isolation with fake models."""

import os
import threading
import time
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pytest
import redis
from prometheus_client import generate_latest

from pipeline.analysis import CameraAnalyzer
from pipeline.config import ConfigError, MTCNNConfig, PipelineConfig, SourceConfig, parse_config
from pipeline.detection import FaceDetection, build_detector
from pipeline.events import EventPublisher, ExpressionEvent, stream_key, validate_event_dict
from pipeline.frames import StreamState, VideoFrame
from pipeline.metrics import PipelineMetrics
from pipeline.runner import ModelStages, StreamPipeline
from tests.media import encode_test_clip
from tests.pipeline.conftest import make_metadata
from tests.pipeline.events.helpers import MemorySink

PEOPLE = {"head-pose-face-detection-female-and-male": 2, "face-demographics-walking-and-pause": 3}


@pytest.fixture(scope="module")
def models() -> ModelStages:
    return ModelStages.build(PipelineConfig())


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


def test_a_camera_the_detector_fails_on_does_not_stop_a_good_one(models, redis_server, shared_clips, tmp_path):
    # The case: MTCNN has no image pyramid for a 1920x40 frame (640x13 after downscaling) and
    # raised out of the whole batch, so `ferstream run` stopped the good camera too. (The default
    # BlazeFace takes such frames, so the detector here is MTCNN, as in the report.)
    mtcnn = MTCNNConfig()
    models = ModelStages(build_detector(mtcnn), models.classifier, mtcnn.detection_size, face_margin=0.0)
    thin = encode_test_clip(tmp_path / "thin.mp4", frames=40, size=(1920, 40))
    cameras = [
        {"camera_id": "good", "url": str(shared_clips["face-demographics-walking-and-pause"]), "realtime": False, "target_fps": None},
        {"camera_id": "thin", "url": str(thin), "realtime": False, "target_fps": None},
    ]
    pipeline, metrics = make_pipeline(models, redis_server.url, cameras)
    try:
        # A cap, not a speed test: every frame must be processed (asserted below), and MTCNN on a loaded 2-core machine takes minutes.
        pipeline.run(max_seconds=300)
    finally:
        pipeline.close()
    value = metrics.registry.get_sample_value
    decoded = value("ferstream_frames_decoded_total", {"camera": "good"})
    frames = {event.frame_index for event in read_events(redis_server.url, "good")}
    assert decoded and len(frames) >= 0.9 * decoded, f"good camera: events for {len(frames)} of {decoded} frames"
    assert value("ferstream_frames_failed_total", {"camera": "thin", "stage": "detect"}) == value(
        "ferstream_frames_decoded_total", {"camera": "thin"}
    )
    assert value("ferstream_frames_decoded_total", {"camera": "thin"}) == 40
    assert value("ferstream_frames_failed_total", {"camera": "good", "stage": "detect"}) is None
    assert read_events(redis_server.url, "thin") == []


# -- failure isolation with fake models (unit) ---------------------------------------------------------

CLASSES = ("happy", "neutral", "sad")


class ThinFrameDetector:
    """Finds one face per frame; fails like MTCNN on a frame too thin for its image pyramid."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[list[FaceDetection]]:
        self.batches.append(len(images))
        if any(min(image.shape[:2]) < 20 for image in images):
            raise ValueError("torch.cat(): expected a non-empty list of Tensors")
        return [[FaceDetection(box=(1.0, 1.0, 30.0, 30.0), score=0.99)] for _ in images]


class FakeClassifier:
    """The frames are one value each, and so are their colour crops; a crop of value 13 makes the model fail."""

    classes = CLASSES
    model_id = "fake@1"
    metadata = make_metadata(classes=CLASSES, grayscale=False, mean=(0.5,) * 3, std=(0.25,) * 3, model_id=model_id)

    def predict(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        if any(int(crop[0, 0, 0]) == 13 for crop in crops):
            raise RuntimeError("classifier exploded")
        return np.tile(np.array([[0.7, 0.2, 0.1]], np.float32), (len(crops), 1))


def fake_frame(camera_id: str, index: int, shape: tuple[int, int] = (64, 64), value: int = 0) -> VideoFrame:
    return VideoFrame(camera_id, index, index / 5, 1_700_000_000.0 + index, np.full((*shape, 3), value, np.uint8))


def fake_pipeline() -> tuple[StreamPipeline, MemorySink, PipelineMetrics]:
    config = PipelineConfig()
    metrics, sink = PipelineMetrics(), MemorySink()
    models = ModelStages(ThinFrameDetector(), FakeClassifier(), 640, face_margin=0.0)  # type: ignore[arg-type]
    pipeline = StreamPipeline(config, metrics, models, EventPublisher(config.events, metrics, sink))
    for camera_id in ("good", "thin", "odd"):
        pipeline._analyzers[camera_id] = CameraAnalyzer(
            camera_id, config.tracker, CLASSES, "fake@1", pipeline.publisher, metrics, pipeline.failures
        )
    return pipeline, sink, metrics


def failed(metrics: PipelineMetrics, camera: str, stage: str) -> float | None:
    return metrics.registry.get_sample_value("ferstream_frames_failed_total", {"camera": camera, "stage": stage})


def test_a_frame_the_detector_fails_on_costs_that_frame_only() -> None:
    pipeline, sink, metrics = fake_pipeline()
    for index in range(3):
        published = pipeline.process([fake_frame("good", index), fake_frame("thin", index, shape=(2, 1920))])
        assert list(published) == ["good"] and len(published["good"]) == 1
    assert [event.camera_id for event in sink.written] == ["good"] * 3
    assert failed(metrics, "thin", "detect") == 3 and failed(metrics, "good", "detect") is None
    assert metrics.registry.get_sample_value("ferstream_faces_detected_total", {"camera": "good"}) == 3
    # The first batch: once together, then each frame alone; after that the failing camera's
    # frames are called alone from the start, so the good camera's batch runs once.
    assert pipeline.models.detector.batches == [2, 1, 1] + [1, 1] * 2
    pipeline.publisher.close()


def test_a_frame_the_classifier_fails_on_costs_that_frame_only() -> None:
    pipeline, sink, metrics = fake_pipeline()
    published = pipeline.process([fake_frame("good", 0), fake_frame("odd", 0, value=13), fake_frame("thin", 0, shape=(2, 1920))])
    assert list(published) == ["good"]
    assert failed(metrics, "odd", "classify") == 1 and failed(metrics, "thin", "detect") == 1
    assert failed(metrics, "good", "classify") is None
    assert [event.camera_id for event in sink.written] == ["good"]
    pipeline.publisher.close()


def test_a_frame_the_tracker_or_the_publisher_fails_on_costs_that_frame_only(monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline, sink, metrics = fake_pipeline()

    def broken_update(*_args: object) -> None:
        raise IndexError("tracker bug")

    monkeypatch.setattr(pipeline._analyzers["odd"].tracker, "update", broken_update)
    published = pipeline.process([fake_frame("good", 0), fake_frame("odd", 0)])
    assert published == {"good": sink.written, "odd": []} and len(sink.written) == 1
    assert failed(metrics, "odd", "track") == 1

    sink.error = TypeError("a sink bug, not an outage")  # not EventSinkUnavailable: publish raises
    assert pipeline.process([fake_frame("good", 1)]) == {"good": []}
    assert failed(metrics, "good", "publish") == 1
    sink.error = None
    assert len(pipeline.process([fake_frame("good", 2)])["good"]) == 1
    pipeline.publisher.close()


def test_removing_a_camera_removes_its_metric_series(tmp_path) -> None:
    pipeline, sink, metrics = fake_pipeline()
    clip = encode_test_clip(tmp_path / "clip.mp4", frames=10)
    for camera_id in ("gone", "kept"):
        pipeline.add_camera(SourceConfig(camera_id=camera_id, url=str(clip), realtime=False, target_fps=None))
    pipeline.run(max_seconds=30)
    assert metrics.registry.get_sample_value("ferstream_frames_decoded_total", {"camera": "gone"}) == 10
    assert any(event.camera_id == "gone" for event in sink.written)
    pipeline.remove_camera("gone")
    exposition = generate_latest(metrics.registry).decode()
    assert 'camera="gone"' not in exposition and 'camera="kept"' in exposition
    pipeline.close()  # a shutdown keeps the series for the last scrape and the exit summary
    assert metrics.registry.get_sample_value("ferstream_frames_decoded_total", {"camera": "kept"}) == 10
    assert metrics.registry.get_sample_value("ferstream_stream_up", {"camera": "kept"}) == 0


def test_event_keys_do_not_repeat_when_a_camera_is_removed_and_added_again(tmp_path) -> None:
    pipeline, sink, _metrics = fake_pipeline()
    clip = encode_test_clip(tmp_path / "clip.mp4", frames=10)
    camera = SourceConfig(camera_id="lobby", url=str(clip), realtime=False, target_fps=None)
    for _start in range(2):  # DELETE then POST of the same camera: the clip and its frame indices start again
        pipeline.add_camera(camera)
        pipeline.run(max_seconds=30)
        pipeline.remove_camera("lobby")
    events = [event for event in sink.written if event.camera_id == "lobby"]
    assert len(events) == 20
    old_keys = [(event.camera_id, event.frame_index, event.track_id) for event in events]
    assert len(set(old_keys)) == 10  # what consumers de-duplicated on before run_id: real events would be dropped
    keys = [(event.camera_id, event.run_id, event.frame_index, event.track_id) for event in events]
    assert len(set(keys)) == 20
    assert len({event.run_id for event in events}) == 2
    pipeline.close()


# -- detector.interval ----------------------------------------------------------------------------------


class MovingFaceDetector:
    """One face that moves 3 px right per frame index; counts the frames it is called on."""

    def __init__(self) -> None:
        self.frames_seen: list[int] = []

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[list[FaceDetection]]:
        self.frames_seen.extend(int(image[0, 0, 1]) for image in images)
        return [[FaceDetection((10.0 + 3 * int(image[0, 0, 1]), 10.0, 40.0 + 3 * int(image[0, 0, 1]), 40.0), 0.99)] for image in images]


def test_detection_interval_detects_every_nth_frame_and_classifies_every_frame_on_carried_boxes() -> None:
    config = parse_config(PipelineConfig, {"detector": {"interval": 3}}, "test")
    metrics, sink = PipelineMetrics(), MemorySink()
    detector = MovingFaceDetector()
    pipeline = StreamPipeline(
        config, metrics, ModelStages(detector, FakeClassifier(), 640, face_margin=0.0), EventPublisher(config.events, metrics, sink)
    )  # type: ignore[arg-type]
    pipeline._analyzers["cam"] = CameraAnalyzer(
        "cam", config.tracker, CLASSES, "fake@1", pipeline.publisher, metrics, pipeline.failures, detection_interval=3
    )
    for index in range(7):
        frame = fake_frame("cam", index)
        frame.image[0, 0, 1] = index  # the detector reads the frame index from a pixel
        pipeline.process([frame])
    assert detector.frames_seen == [0, 3, 6]
    assert [event.frame_index for event in sink.written] == list(range(7))  # every frame classified
    assert {event.track_id for event in sink.written} == {1}  # one track throughout
    # Frames 1-2 have no velocity yet; frame 3's detection (x1 = 19, 9 px in 3 frames) gives the track 3 px per
    # frame, so frames 4 and 5 are carried on to where the face really is.
    boxes = {event.frame_index: event.box for event in sink.written}
    assert boxes[0] == boxes[1] == boxes[2] == (10, 10, 40, 40)
    assert [boxes[index][0] for index in (3, 4, 5, 6)] == [19, 22, 25, 28]
    assert metrics.registry.get_sample_value("ferstream_faces_detected_total", {"camera": "cam"}) == 3
    pipeline.publisher.close()


def test_stop_sources_stops_every_camera_at_once_and_keeps_them_listed(tmp_path) -> None:
    pipeline, _sink, _metrics = fake_pipeline()
    clip = encode_test_clip(tmp_path / "clip.mp4", frames=50)
    for camera_id in ("c1", "c2", "c3"):
        pipeline.add_camera(SourceConfig(camera_id=camera_id, url=str(clip), loop=True, realtime=True, target_fps=10))
    deadline = time.monotonic() + 10.0
    while any(status.state is not StreamState.STREAMING for status in pipeline.statuses()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pipeline.stop_sources(timeout_s=5.0) == []
    statuses = pipeline.statuses()  # still there for the exit summary; close() removes them
    assert sorted(status.camera_id for status in statuses) == ["c1", "c2", "c3"]
    assert all(status.state is StreamState.STOPPED for status in statuses)
    assert not [thread.name for thread in threading.enumerate() if thread.name.startswith("ferstream-stop-")]
    pipeline.close()


# -- a Redis outage under 4 cameras (real sources, real redis-server, fake models) ----------------------

OUTAGE_CAMERAS = ("cam1", "cam2", "cam3", "cam4")
# 8 s in CI; the figure is 30 s: FERSTREAM_OUTAGE_S=30 (benchmarks/RELIABILITY.md has the command and results).
OUTAGE_S = float(os.environ.get("FERSTREAM_OUTAGE_S", "8"))


def event_key(event: ExpressionEvent) -> tuple[str, str, int, int]:
    return (event.camera_id, event.run_id, event.frame_index, event.track_id)


@pytest.mark.integration
@pytest.mark.parametrize("buffer_max_events", [10_000, 100], ids=["within-the-buffer", "beyond-the-buffer"])
def test_a_redis_outage_under_four_cameras_loses_only_what_overflows_the_buffer_and_counts_it(
    redis_server, tmp_path, buffer_max_events: int
) -> None:
    clip = encode_test_clip(tmp_path / "clip.mp4", frames=50)
    events_config = {"redis_url": redis_server.url, "buffer_max_events": buffer_max_events, "retry": {"initial_s": 0.2, "max_s": 1.0}}
    config = parse_config(PipelineConfig, {"events": events_config}, "test")
    metrics = PipelineMetrics()
    produced: list[ExpressionEvent] = []  # every event the pipeline published, in publish order
    models = ModelStages(ThinFrameDetector(), FakeClassifier(), 640, face_margin=0.0)  # type: ignore[arg-type]
    publisher = EventPublisher(config.events, metrics)
    pipeline = StreamPipeline(config, metrics, models, publisher, on_events=lambda _camera, events: produced.extend(events))
    for camera_id in OUTAGE_CAMERAS:
        pipeline.add_camera(SourceConfig(camera_id=camera_id, url=str(clip), loop=True, realtime=True, target_fps=10))
    assert 1.0 <= OUTAGE_S <= 600.0, f"FERSTREAM_OUTAGE_S={OUTAGE_S}: 1 to 600 seconds"
    runner = threading.Thread(target=pipeline.run, kwargs={"max_seconds": OUTAGE_S + 60}, daemon=True)
    runner.start()
    try:
        time.sleep(2.0)
        # Redis saves its data when it stops and loads it at start: what it acknowledged before it went
        # down survives, so every event is either in a stream or counted as dropped (none is lost with it).
        redis.Redis.from_url(redis_server.url).config_set("save", "3600 1")
        down_from = len(produced)
        redis_server.stop()  # the process is gone: every write fails at once
        time.sleep(OUTAGE_S)
        during_outage = len(produced) - down_from
        redis_server.start()  # same port, same data
        time.sleep(3.0)
    finally:
        pipeline.stop()
        runner.join(10.0)
        pipeline.stop_sources()
        publisher.close(10.0)
        pipeline.close()

    # ~4 cameras x 10 fps x 8 s: the outage really held events (and overflowed the small buffer).
    assert during_outage > 200, during_outage
    assert all({event.camera_id for event in produced[down_from:]} >= {camera_id} for camera_id in OUTAGE_CAMERAS)
    stored = [event for camera_id in OUTAGE_CAMERAS for event in read_events(redis_server.url, camera_id)]
    stored_keys = [event_key(event) for event in stored]
    assert len(stored_keys) == len(set(stored_keys)), "duplicates after recovery"
    produced_keys = [event_key(event) for event in produced]
    assert len(produced_keys) == len(set(produced_keys))
    lost = set(produced_keys) - set(stored_keys)
    assert set(stored_keys) <= set(produced_keys)
    drops = sum(
        metrics.registry.get_sample_value("ferstream_events_dropped_total", {"camera": camera_id, "reason": reason}) or 0
        for camera_id in OUTAGE_CAMERAS
        for reason in ("buffer_full", "closed")
    )
    assert drops == len(lost)  # every event that did not arrive is counted, exactly
    print(
        f"outage {OUTAGE_S:g} s, buffer {buffer_max_events}: {len(produced)} events published, {during_outage} during the "
        f"outage, {len(stored)} stored, {len(lost)} lost, {drops:g} counted as dropped, 0 duplicates"
    )
    if buffer_max_events >= during_outage:
        assert not lost  # 0 events lost within the buffer
    else:
        # The buffer kept the newest: what was lost is one run of the oldest outage events, every camera's.
        positions = sorted(produced_keys.index(key) for key in lost)
        assert positions == list(range(positions[0], positions[0] + len(positions)))
        # Outage events older than that run that did arrive were written before the process was gone (stop()
        # takes a moment); the rest of the outage is the lost run plus a full buffer.
        stored_set = set(stored_keys)
        written_before_down = sum(key in stored_set for key in produced_keys[down_from : positions[0]])
        assert len(lost) >= during_outage - buffer_max_events - written_before_down
        assert metrics.registry.get_sample_value("ferstream_events_dropped_total", {"camera": "cam1", "reason": "closed"}) is None


def test_a_prior_that_does_not_fit_the_model_fails_at_start_and_one_that_does_reaches_every_camera(tmp_path) -> None:
    models = ModelStages(ThinFrameDetector(), FakeClassifier(), 640, face_margin=0.0)  # type: ignore[arg-type]
    metrics = PipelineMetrics()
    misfit = parse_config(PipelineConfig, {"priors": {"deployment_prior": {"happy": 1, "sad": 1}}}, "test")
    publisher = EventPublisher(misfit.events, metrics, MemorySink())
    # The fake model's classes are not FER2013's, so it needs a train_prior too; the first problem is named.
    with pytest.raises(ConfigError, match=r"^priors\.train_prior: required"):
        StreamPipeline(misfit, metrics, models, publisher)
    uniform = {name: 1 for name in CLASSES}
    missing = parse_config(PipelineConfig, {"priors": {"deployment_prior": {"happy": 1, "sad": 1}, "train_prior": uniform}}, "test")
    with pytest.raises(ConfigError, match=r"^priors\.deployment_prior: missing neutral"):
        StreamPipeline(missing, metrics, models, publisher)

    clip = tmp_path / "clip.mp4"
    encode_test_clip(clip, frames=2)
    fitting = parse_config(
        PipelineConfig,
        {"priors": {"deployment_prior": {"happy": 1, "neutral": 4, "sad": 1}, "train_prior": uniform}, "events": {"abstain_below": 0.3}},
        "test",
    )
    pipeline = StreamPipeline(fitting, metrics, models, publisher)
    pipeline.add_camera(SourceConfig(camera_id="cam", url=str(clip), realtime=False))
    try:
        analyzer = pipeline._analyzers["cam"]
        assert analyzer.prior_adjuster is not None and analyzer.abstain_below == 0.3
        # The fake's (0.7, 0.2, 0.1) times (1, 4, 1) is (0.7, 0.8, 0.1): neutral.
        published = pipeline.process([fake_frame("cam", 0)])["cam"]
        assert [event.emotion for event in published] == ["neutral"]
        assert published[0].confidence == pytest.approx(0.8 / 1.6)
    finally:
        pipeline.close()
