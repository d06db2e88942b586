"""Fault injection with mutated inputs (issue 11): damaged and unusual files, made with PyAV at test time, fed
as cameras through the real source, the real BlazeFace detector and the shipped classifier.

Two sets. The bulk set (``BULK_VARIANTS`` bit-flipped and truncated copies of a small clip) goes through
``CameraSource`` one file each, and every ``DETECT_EVERY``-th variant's decoded frames through detection and
classification (``StreamPipeline.process``), which is where the cost is. The camera set (the special
cases and ``PIPELINE_FLIPS`` more bit flips) runs as cameras of one ``StreamPipeline`` next to a good camera
with faces, events going to a real redis-server. Either way: nothing crashes, what fails is counted on its
own camera, and the good camera publishes events for every one of its frames.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from pipeline.config import PipelineConfig, SourceConfig, parse_config
from pipeline.events import EventPublisher, ExpressionEvent, stream_key
from pipeline.frames import SourceStatus, StreamState, VideoFrame
from pipeline.metrics import PipelineMetrics
from pipeline.runner import ModelStages, StreamPipeline
from pipeline.sources.camera import CameraSource
from pipeline.sources.readers import frame_reader_for
from tests.media import encode_test_clip
from tests.mutated_media import audio_only, bit_flips, empty_sample_table, encode_clip, truncation
from tests.pipeline.events.helpers import MemorySink

pytestmark = pytest.mark.integration

SEED = 20261203
BULK_VARIANTS = 1000  # every 5th a truncation, the others bit flips
DETECT_EVERY = 20
PIPELINE_FLIPS = 12
GOOD_CLIP = "face-demographics-walking-and-pause"
log = logging.getLogger("test.mutated_inputs")
# The decode thread's own crash handler writes this; a mutated file must never get there.
INTERNAL_ERROR = "internal error"


@pytest.fixture(scope="module")
def models() -> ModelStages:
    config = PipelineConfig()
    assert config.detector.kind == "blazeface"  # the default detector is the one under test
    return ModelStages.build(config)


def file_camera(camera_id: str, path: Path) -> dict:
    # Lossless (realtime off, no fps limit): every decodable frame is handed on, so the counts are exact.
    return {"camera_id": camera_id, "url": str(path), "realtime": False, "target_fps": None, "open_timeout_s": 5, "watchdog_timeout_s": 5}


def drain(source: CameraSource) -> Iterator[VideoFrame]:
    while True:
        frame = source.read(timeout=0.5)
        if frame is not None:
            yield frame
        elif source.finished:
            return


def sample(metrics: PipelineMetrics, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    total = 0.0
    for family in metrics.registry.collect():
        for found in family.samples:
            if found.name == name and all(found.labels.get(key) == value for key, value in labels.items()):
                total += found.value
    return total


def outcome(status: SourceStatus, errors: float) -> str:
    if status.state is StreamState.FAILED:
        return "failed"
    if status.frames_decoded:
        return "ended with frames" + (", errors counted" if errors else "")
    return "ended empty" + (", errors counted" if errors else ", nothing counted")


def test_a_thousand_mutated_files_through_the_source_and_the_models(models: ModelStages, tmp_path: Path) -> None:
    base = encode_test_clip(tmp_path / "base.mp4", frames=6, gop=3).read_bytes()
    rng = np.random.default_rng(SEED)
    metrics = PipelineMetrics()
    config = PipelineConfig()
    pipeline = StreamPipeline(config, metrics, models, EventPublisher(config.events, metrics, MemorySink()))
    outcomes: dict[str, int] = {}
    decoded = through_models = 0
    for index in range(BULK_VARIANTS):
        data = truncation(base, rng) if index % 5 == 0 else bit_flips(base, rng)
        path = tmp_path / f"variant{index}.mp4"
        path.write_bytes(data)
        # A registry per variant: reading one with a thousand cameras' series would cost more than decoding.
        source_metrics = PipelineMetrics()
        camera = parse_config(SourceConfig, file_camera("variant", path), "variant")
        source = CameraSource(camera, source_metrics, reader=frame_reader_for(camera.url))
        source.start()
        frames = list(drain(source))
        source.stop()
        status = source.status()
        path.unlink()
        assert status.state in (StreamState.ENDED, StreamState.FAILED), (index, status)
        assert INTERNAL_ERROR not in (status.last_error or ""), (index, status.last_error)
        assert status.frames_decoded == len(frames) and status.frames_dropped == 0
        # FFmpeg reads a file damaged into one without a decodable frame as an empty clip: that is a counted failure.
        assert status.frames_decoded or status.state is StreamState.FAILED, (index, status)
        errors = sample(source_metrics, "ferstream_decode_errors_total", camera="variant")
        if status.state is StreamState.FAILED or status.last_error is not None:
            assert errors >= 1, (index, status)  # a failure is counted, on this camera
        kind = outcome(status, errors)
        outcomes[kind] = outcomes.get(kind, 0) + 1
        decoded += len(frames)
        if index % DETECT_EVERY == 0 and frames:
            # What a damaged file decodes to goes through detection and classification like any frame
            # (the camera has no tracker here: its events are not the point, the models' input is).
            for frame in frames:
                pipeline.process([VideoFrame(f"v{index}", frame.frame_index, frame.pts_s, frame.capture_time, frame.image)])
            through_models += len(frames)
    pipeline.publisher.close()
    log.warning("bulk: %d variants: %s; %d frames decoded, %d through the models", BULK_VARIANTS, outcomes, decoded, through_models)
    # Both kinds of outcome happen, or the mutations test nothing: some variants still decode, some do not open.
    assert outcomes.get("failed", 0) >= 0.1 * BULK_VARIANTS and outcomes.get("ended with frames", 0) >= 0.1 * BULK_VARIANTS, outcomes
    assert metrics.registry.get_sample_value("ferstream_batch_size_sum", {"stage": "detect"}) == through_models > 0
    assert sample(metrics, "ferstream_frames_failed_total") == 0  # no decoded frame, however damaged, fails a model


def test_a_file_with_a_video_stream_and_no_frame_is_counted_on_its_camera(tmp_path: Path) -> None:
    path = tmp_path / "no-samples.mp4"
    path.write_bytes(empty_sample_table(encode_test_clip(tmp_path / "clip.mp4", frames=6, gop=3).read_bytes()))
    metrics = PipelineMetrics()
    camera = parse_config(SourceConfig, file_camera("empty", path), "empty")
    source = CameraSource(camera, metrics, reader=frame_reader_for(camera.url))
    source.start()
    assert list(drain(source)) == []
    source.stop()
    assert sample(metrics, "ferstream_decode_errors_total", camera="empty") >= 1
    assert source.status().last_error is not None


def special_cases(directory: Path, good: Path) -> dict[str, Path]:
    """The issue's list: each camera id names what is wrong with its file."""
    clip = encode_test_clip(directory / "clip.mp4", frames=6, gop=3)
    data = clip.read_bytes()
    files = {
        "zero-length": directory / "zero.mp4",
        "truncated-header": directory / "header.mp4",
        "truncated-half": directory / "half.mp4",
        "truncated-good": directory / "good-cut.mp4",
        "garbage": directory / "garbage.mp4",
    }
    files["zero-length"].write_bytes(b"")
    files["truncated-header"].write_bytes(data[:200])
    files["truncated-half"].write_bytes(data[: len(data) // 2])
    files["truncated-good"].write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    files["garbage"].write_bytes(np.random.default_rng(SEED).bytes(len(data)))
    files["audio-only"] = audio_only(directory / "audio.m4a")
    files["one-pixel"] = encode_clip(directory / "one.mkv", (1, 1), "gray", codec="ffv1", frames=3)
    files["thin"] = encode_clip(directory / "thin.mp4", (1920, 40), frames=3)
    files["uhd"] = encode_clip(directory / "uhd.mp4", (3840, 2160), frames=2)
    files["above-uhd"] = encode_clip(directory / "above.mp4", (4096, 2160), frames=2)  # above max_frame_pixels
    files["gray"] = encode_clip(directory / "gray.mkv", (160, 96), "gray", codec="ffv1", frames=3)
    files["yuv444"] = encode_clip(directory / "yuv444.mp4", (160, 96), "yuv444p", frames=3)
    files["tenbit"] = encode_clip(directory / "tenbit.mp4", (160, 96), "yuv420p10le", frames=3)
    files["tenbit-lossless"] = encode_clip(directory / "tenbit.mkv", (160, 96), "yuv420p10le", codec="ffv1", frames=3)
    rng = np.random.default_rng(SEED + 1)
    for index in range(PIPELINE_FLIPS):
        files[f"flip{index}"] = directory / f"flip{index}.mp4"
        files[f"flip{index}"].write_bytes(bit_flips(data, rng))
    return files


def read_events(redis_url: str, camera_id: str) -> list[ExpressionEvent]:
    client = redis.Redis.from_url(redis_url)
    try:
        return [ExpressionEvent.from_fields(fields) for _id, fields in client.xrange(stream_key("ferstream", camera_id))]
    finally:
        client.close()


def test_mutated_cameras_next_to_a_good_one_cost_their_own_frames_only(models: ModelStages, redis_server, shared_clips, tmp_path):
    good = shared_clips[GOOD_CLIP]
    bad = special_cases(tmp_path, good)
    cameras = [file_camera("good", good)] + [file_camera(camera_id, path) for camera_id, path in bad.items()]
    config = parse_config(PipelineConfig, {"cameras": cameras, "events": {"redis_url": redis_server.url}}, "test")
    metrics = PipelineMetrics()
    pipeline = StreamPipeline(config, metrics, models, EventPublisher(config.events, metrics))
    for camera in config.cameras:
        pipeline.add_camera(camera)
    try:
        pipeline.run(max_seconds=120)
        statuses = {status.camera_id: status for status in pipeline.statuses()}
    finally:
        pipeline.close()

    for camera_id, status in statuses.items():
        assert status.state in (StreamState.ENDED, StreamState.FAILED), (camera_id, status)
        assert INTERNAL_ERROR not in (status.last_error or ""), (camera_id, status.last_error)
        if status.state is StreamState.FAILED or status.last_error is not None:
            assert sample(metrics, "ferstream_decode_errors_total", camera=camera_id) >= 1, camera_id  # counted, on this camera
    report = {}
    for camera_id in bad:
        errors = sample(metrics, "ferstream_decode_errors_total", camera=camera_id)
        failed = sample(metrics, "ferstream_frames_failed_total", camera=camera_id)
        dropped = sample(metrics, "ferstream_frames_dropped_total", camera=camera_id)
        report[camera_id] = (statuses[camera_id].state.value, statuses[camera_id].frames_decoded, errors, failed, dropped)
    log.warning("cameras: %s", report)

    # The special cases, each on its own camera: files that cannot be opened fail with a counted open error ...
    for camera_id in ("zero-length", "truncated-header", "truncated-good", "garbage", "audio-only"):
        assert statuses[camera_id].state is StreamState.FAILED and statuses[camera_id].frames_decoded == 0, camera_id
        assert sample(metrics, "ferstream_decode_errors_total", camera=camera_id, kind="open") >= 1, camera_id
    assert "no video stream" in (statuses["audio-only"].last_error or "")
    # ... a frame above max_frame_pixels is counted and dropped before its BGR copy ...
    assert statuses["above-uhd"].frames_decoded == 2
    assert sample(metrics, "ferstream_frames_dropped_total", camera="above-uhd", reason="too_large") == 2
    # ... and the odd but valid formats decode fully and go through both models without a failure.
    for camera_id, frames in {"one-pixel": 3, "thin": 3, "uhd": 2, "gray": 3, "yuv444": 3, "tenbit": 3, "tenbit-lossless": 3}.items():
        assert statuses[camera_id].frames_decoded == frames and statuses[camera_id].last_error is None, camera_id
        assert sample(metrics, "ferstream_frames_failed_total", camera=camera_id) == 0, camera_id
    # Every frame handed out went through detection (detector.interval is 1): none was lost between source and model.
    handed_out = sum(status.frames_decoded - status.frames_dropped for status in statuses.values())
    assert config.detector.interval == 1
    assert metrics.registry.get_sample_value("ferstream_batch_size_sum", {"stage": "detect"}) == handed_out

    # The good camera: every frame decoded, none lost, events for each of its frames.
    decoded = statuses["good"].frames_decoded
    assert decoded == 41 and statuses["good"].state is StreamState.ENDED and statuses["good"].last_error is None
    assert sample(metrics, "ferstream_frames_failed_total", camera="good") == 0
    assert sample(metrics, "ferstream_decode_errors_total", camera="good") == 0
    assert sample(metrics, "ferstream_frames_dropped_total", camera="good") == 0
    events = read_events(redis_server.url, "good")
    assert sorted({event.frame_index for event in events}) == list(range(decoded))
    assert len(events) == sample(metrics, "ferstream_events_published_total", camera="good") > 0
