"""Face detection: the detector interface, the frame downscale for detection, and the registry of detectors
(one module each in ``pipeline/detectors/``).

Detectors work on downscaled frames (``detection_size`` on the longest side), which is
what travels to a detector replica in the Serve app; ``scale_detections`` maps the boxes
back to full-frame pixels.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import cv2
import numpy as np

from pipeline.config import AnyDetectorConfig

Box = tuple[float, float, float, float]
Point = tuple[float, float]


@dataclass(frozen=True)
class FaceDetection:
    """One face. ``box`` is (x1, y1, x2, y2) in pixels; ``landmarks`` are five points
    (left eye, right eye, nose, left mouth corner, right mouth corner) when the detector has them."""

    box: Box
    score: float
    landmarks: tuple[Point, ...] | None = None

    def scaled(self, factor: float) -> FaceDetection:
        box = (self.box[0] * factor, self.box[1] * factor, self.box[2] * factor, self.box[3] * factor)
        landmarks = None if self.landmarks is None else tuple((x * factor, y * factor) for x, y in self.landmarks)
        return FaceDetection(box=box, score=self.score, landmarks=landmarks)


@dataclass(frozen=True)
class DetectionInput:
    """A frame downscaled for detection; ``scale`` multiplies its coordinates back to full frame."""

    image: np.ndarray  # H x W x 3 uint8 BGR
    scale: float


def downscale_for_detection(image: np.ndarray, detection_size: int) -> DetectionInput:
    """Shrink so the longest side is at most ``detection_size``; never upscale."""
    height, width = image.shape[:2]
    longest = max(height, width)
    if longest <= detection_size:
        return DetectionInput(image=image, scale=1.0)
    factor = detection_size / longest
    small = cv2.resize(image, (max(1, round(width * factor)), max(1, round(height * factor))), interpolation=cv2.INTER_AREA)
    return DetectionInput(image=small, scale=longest / detection_size)


def scale_detections(detections: Sequence[FaceDetection], scale: float) -> list[FaceDetection]:
    return list(detections) if scale == 1.0 else [detection.scaled(scale) for detection in detections]


class FaceDetector(Protocol):
    """Finds faces in a batch of (already downscaled) BGR images, in those images' pixels."""

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[list[FaceDetection]]: ...


def detect_frames(detector: FaceDetector, frames: Sequence[np.ndarray], detection_size: int) -> list[list[FaceDetection]]:
    """Downscale full frames, detect in one batch, and map the boxes back to full-frame pixels."""
    inputs = [downscale_for_detection(frame, detection_size) for frame in frames]
    found = detector.detect_batch([item.image for item in inputs])
    return [scale_detections(detections, item.scale) for detections, item in zip(found, inputs, strict=True)]


# kind -> the detector's class, as "module:attribute". Each detector is imported only when chosen, so
# an install without one detector's packages (facenet-pytorch, the TFLite runtime) still runs the
# others. A new detector is a module in pipeline/detectors/, its config in pipeline/config.py's
# AnyDetectorConfig union, and one entry here.
DETECTOR_CLASSES: dict[str, str] = {
    "blazeface": "pipeline.detectors.blazeface:BlazeFaceDetector",
    "mtcnn": "pipeline.detectors.mtcnn:MTCNNDetector",
    "yunet": "pipeline.detectors.yunet:YuNetDetector",
}


def build_detector(config: AnyDetectorConfig) -> FaceDetector:
    module_name, _, attribute = DETECTOR_CLASSES[config.kind].partition(":")
    detector_class: Callable[[Any], FaceDetector] = getattr(importlib.import_module(module_name), attribute)
    return detector_class(config)
