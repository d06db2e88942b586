"""Failure isolation in the model deployments: one bad item of a ``@serve.batch`` fails its own request only."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from pipeline.batching import BusyAwareBatchWait
from pipeline.detection import FaceDetection
from pipeline.metrics import PipelineMetrics
from serve_app.deployments import FaceDetectorDeployment, item_result, per_item


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
