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

from pipeline.classification import ExpressionClassifier
from pipeline.config import PipelineConfig, SourceConfig, parse_config
from pipeline.detection import build_detector
from pipeline.events import EventPublisher, ExpressionEvent, stream_key
from pipeline.metrics import PipelineMetrics
from pipeline.runner import ModelStages, StreamPipeline
from pipeline.sources import CameraSource, StreamState, VideoFrame
from tests.media import encode_test_clip
from tests.mutated_media import audio_only, bit_flips, encode_clip, truncation
from tests.pipeline.events.helpers import MemorySink

pytestmark = pytest.mark.integration

SEED = 20261203
BULK_VARIANTS = 1000  # every 5th a truncation, the others bit flips
DETECT_EVERY = 10
PIPELINE_FLIPS = 24
GOOD_CLIP = "face-demographics-walking-and-pause"
# The decode thread's own crash handler writes this; a mutated file must never get there.
INTERNAL_ERROR = "internal error"


@pytest.fixture(scope="module")
def models() -> ModelStages:
    config = PipelineConfig()
    assert config.detector.kind == "blazeface"  # the default detector is the one under test
    return ModelStages(build_detector(config.detector), ExpressionClassifier(config.classifier), config.detector.detection_size)


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
        camera_id = f"v{index}"
        source = CameraSource(parse_config(SourceConfig, file_camera(camera_id, path), "variant"), metrics)
        source.start()
        frames = list(drain(source))
        source.stop()
        status = source.status()
        path.unlink()
        assert status.state in (StreamState.ENDED, StreamState.FAILED), (index, status)
        assert INTERNAL_ERROR not in (status.last_error or ""), (index, status.last_error)
        assert status.frames_decoded == len(frames) and status.frames_dropped == 0
        errors = sample(metrics, "ferstream_decode_errors_total", camera=camera_id)
        if status.state is StreamState.FAILED or status.last_error is not None:
            assert errors >= 1, (index, status)  # a failure is counted, on this camera
        outcomes[status.state.value] = outcomes.get(status.state.value, 0) + 1
        decoded += len(frames)
        if index % DETECT_EVERY == 0 and frames:
            # What a damaged file decodes to goes through detection and classification like any frame
            # (the camera has no tracker here: its events are not the point, the models' input is).
            for frame in frames:
                pipeline.process([frame])
            through_models += len(frames)
    logging.getLogger("test.mutated").warning("bulk: %d variants, %s, %d frames decoded, %d through the models", index + 1, outcomes, decoded, through_models)
    # Both kinds of outcome happen, or the mutations test nothing: some variants still decode, some do not open.
    assert outcomes.get("failed", 0) >= 0.1 * BULK_VARIANTS and outcomes.get("ended", 0) >= 0.1 * BULK_VARIANTS, outcomes
    assert through_models >= 0.2 * BULK_VARIANTS // DETECT_EVERY
    pipeline.publisher.close()

