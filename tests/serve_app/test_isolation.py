"""Failure isolation under Serve: one bad item of a ``@serve.batch`` fails its own request only, and a camera
session counts a failed model call and goes on."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from pipeline.config import EventsConfig, PipelineConfig, SourceConfig
from pipeline.detection import FaceDetection
from pipeline.events import EventPublisher
from pipeline.frames import VideoFrame
from pipeline.isolation import FrameFailures
from pipeline.metrics import PipelineMetrics
from serve_app.batching import BusyAwareBatchWait
from serve_app.deployments import CameraSession, FaceDetectorDeployment, item_result, per_item
from tests.pipeline.conftest import make_metadata
from tests.pipeline.events.helpers import MemorySink

log = logging.getLogger("test.serve_isolation")


class ThinImageDetector:
    """Fails like MTCNN on an image too thin for its pyramid, which used to fail every request of the batch."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def detect_batch(self, images: list[np.ndarray]) -> list[list[FaceDetection]]:
        self.calls.append(len(images))
        if any(min(image.shape[:2]) < 20 for image in images):
            raise ValueError("torch.cat(): expected a non-empty list of Tensors")
        return [[FaceDetection(box=(0.0, 0.0, 10.0, 10.0), score=0.9)] for _ in images]


def test_one_bad_image_in_a_detector_batch_fails_its_own_request_only() -> None:
    deployment_class = FaceDetectorDeployment.func_or_class
    replica = deployment_class.__new__(deployment_class)
    replica.detector, replica.metrics, replica.batch_wait = ThinImageDetector(), PipelineMetrics(), BusyAwareBatchWait(0.05)
    images = [np.zeros((64, 64, 3), np.uint8), np.zeros((13, 640, 3), np.uint8), np.zeros((48, 64, 3), np.uint8)]
    # The method body under @serve.batch (the batching queue itself needs a running replica);
    # @serve.batch hands element i of the returned list to request i.
    results = asyncio.run(deployment_class.detect_batch.__wrapped__(replica, images))
    assert replica.detector.calls == [3, 1, 1, 1]  # one batch, then each image alone
    good, bad, other = results
    assert len(item_result(good)) == 1 and len(item_result(other)) == 1
    with pytest.raises(ValueError, match=r"torch\.cat\(\)"):
        item_result(bad)  # raised in detect(), to that request's caller only
    assert replica.metrics.registry.get_sample_value("ferstream_batch_size_count", {"stage": "detect"}) == 1


def test_per_item_keeps_the_batch_result_when_nothing_fails() -> None:
    calls: list[int] = []

    def model(items: list[int]) -> list[int]:
        calls.append(len(items))
        return [item + 1 for item in items]

    assert per_item(model)([1, 2, 3]) == [2, 3, 4] and calls == [3]
    assert item_result(5) == 5


class FakeResponse:
    def __init__(self, value: Any) -> None:
        self.value = value

    def result(self, timeout_s: float) -> Any:
        if isinstance(self.value, Exception):
            raise self.value
        return self.value


class FakeHandle:
    """A DeploymentHandle whose method ``name`` answers with ``answer(item)`` (an exception is raised by ``result``)."""

    def __init__(self, name: str, answer: Any) -> None:
        setattr(self, name, SimpleNamespace(remote=lambda item: FakeResponse(answer(item))))


def thin_fails(image: np.ndarray) -> Any:
    if min(image.shape[:2]) < 20:
        return ValueError("torch.cat(): expected a non-empty list of Tensors")
    return [FaceDetection(box=(4.0, 4.0, 40.0, 40.0), score=0.95)]


def test_a_camera_session_counts_a_failed_model_call_and_goes_on() -> None:
    metrics, sink = PipelineMetrics(), MemorySink()
    publisher = EventPublisher(EventsConfig(), metrics, sink)
    metadata = make_metadata()
    probabilities = np.full(len(metadata.classes), 1 / len(metadata.classes), np.float32)
    classifier = FakeHandle("classify", lambda crop: RuntimeError("replica restarting") if crop.mean() > 100 else probabilities)
    camera = SourceConfig(camera_id="cam1", url="rtsp://127.0.0.1:9/none")
    session = CameraSession(
        camera, PipelineConfig(), metadata, FakeHandle("detect", thin_fails), classifier, publisher, metrics, FrameFailures(metrics, log)
    )

    def frame(index: int, shape: tuple[int, int], value: int = 0) -> VideoFrame:
        return VideoFrame("cam1", index, index / 5, 1_700_000_000.0 + index, np.full((*shape, 3), value, np.uint8))

    session._process(frame(0, (40, 1920)))  # 640x13 after downscaling: the detector raises
    session._process(frame(1, (64, 64), value=200))  # the classifier raises
    session._process(frame(2, (64, 64)))
    value = metrics.registry.get_sample_value
    assert value("ferstream_frames_failed_total", {"camera": "cam1", "stage": "detect"}) == 1
    assert value("ferstream_frames_failed_total", {"camera": "cam1", "stage": "classify"}) == 1
    assert [event.frame_index for event in sink.written] == [2]
    assert session.failures.counts() == {"cam1": {"detect": 1, "classify": 1}}
    publisher.close()
