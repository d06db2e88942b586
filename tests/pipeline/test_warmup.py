"""Warming the models: each runs once on a dummy batch before any camera frame."""

from collections.abc import Sequence

import numpy as np

from pipeline.classification import ExpressionClassifier
from pipeline.config import ClassifierConfig
from pipeline.detection import FaceDetection
from pipeline.warmup import WARMUP_FRAME_SHAPE, warm_up_classifier, warm_up_detector


class RecordingDetector:
    def __init__(self) -> None:
        self.calls: list[list[tuple[int, ...]]] = []

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[list[FaceDetection]]:
        self.calls.append([image.shape for image in images])
        return [[] for _ in images]


def test_the_detector_gets_one_frame_at_its_detection_size():
    detector = RecordingDetector()
    assert warm_up_detector(detector, detection_size=320) >= 0
    height, width = WARMUP_FRAME_SHAPE[:2]
    assert detector.calls == [[(round(height * 320 / width), 320, 3)]]


def test_the_shipped_classifier_classifies_one_dummy_face(monkeypatch):
    classifier = ExpressionClassifier(ClassifierConfig())
    seen: list[int] = []
    predict = classifier.predict
    monkeypatch.setattr(classifier, "predict", lambda crops: seen.append(len(crops)) or predict(crops))
    assert warm_up_classifier(classifier) >= 0
    assert seen == [1]
