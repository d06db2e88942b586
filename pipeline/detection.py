"""Face detection: a detector interface, batched MTCNN, and OpenCV's YuNet.

Detectors work on downscaled frames (``detection_size`` on the longest side), which is
what travels to a detector replica in the Serve app; ``scale_detections`` maps the boxes
back to full-frame pixels.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from pipeline.config import BlazeFaceConfig, DetectorConfig

log = logging.getLogger("ferstream.detection")

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


class MTCNNDetector:
    """facenet-pytorch's MTCNN (its weights ship inside the wheel, so nothing is downloaded).

    Images of the same size are stacked into one batched forward pass, which is what makes a
    GPU worthwhile; different sizes (cameras with other resolutions) form separate batches.
    """

    def __init__(self, config: DetectorConfig) -> None:
        import torch
        from facenet_pytorch import MTCNN

        if config.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("detector.device is 'cuda' but CUDA is not available")
        self.config = config
        # The last stage threshold is the reported score threshold; the first two stay at the
        # library's defaults, which tune recall of the proposal stages rather than precision.
        self._mtcnn = MTCNN(
            keep_all=True,
            min_face_size=config.min_face_size,
            thresholds=[0.6, 0.7, config.score_threshold],
            post_process=False,
            device=config.device,
        )

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[list[FaceDetection]]:
        results: list[list[FaceDetection]] = [[] for _ in images]
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for index, image in enumerate(images):
            by_shape.setdefault(image.shape, []).append(index)
        for indices in by_shape.values():
            # MTCNN wants RGB; flipping the channel axis is a view, the stack makes one copy.
            batch = np.stack([images[i][:, :, ::-1] for i in indices])
            boxes, scores, points = self._mtcnn.detect(batch, landmarks=True)
            for slot, index in enumerate(indices):
                results[index] = _mtcnn_detections(boxes[slot], scores[slot], points[slot], self.config.score_threshold)
        return results


def _mtcnn_detections(
    boxes: np.ndarray | None, scores: np.ndarray | None, points: np.ndarray | None, threshold: float
) -> list[FaceDetection]:
    if boxes is None or scores is None:
        return []
    detections = []
    for index, box in enumerate(boxes):
        score = float(scores[index])
        if score < threshold:
            continue
        landmarks = None if points is None else tuple((float(x), float(y)) for x, y in points[index])
        detections.append(FaceDetection(box=(float(box[0]), float(box[1]), float(box[2]), float(box[3])), score=score, landmarks=landmarks))
    return detections


class YuNetDetector:
    """OpenCV's ``FaceDetectorYN`` with a user-supplied ONNX model (e.g. face_detection_yunet_2023mar.onnx).

    YuNet has no batch axis in OpenCV's API, so a batch is a loop; it is still far cheaper
    than MTCNN on a CPU.
    """

    def __init__(self, config: DetectorConfig) -> None:
        if config.onnx_path is None:
            raise ValueError("detector.onnx_path is required for the yunet detector")
        model_path = Path(config.onnx_path)
        if not model_path.is_file():
            raise FileNotFoundError(f"detector.onnx_path: no such file: {model_path}")
        if not hasattr(cv2, "FaceDetectorYN"):
            raise RuntimeError("this OpenCV build has no FaceDetectorYN")
        self.config = config
        self._detector = cv2.FaceDetectorYN.create(str(model_path), "", (320, 320), config.score_threshold, 0.3, 5000)
        self._input_size: tuple[int, int] = (320, 320)

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[list[FaceDetection]]:
        results = []
        for image in images:
            size = (image.shape[1], image.shape[0])
            if size != self._input_size:
                self._detector.setInputSize(size)
                self._input_size = size
            _, faces = self._detector.detect(image)
            results.append(_yunet_detections(faces, self.config.min_face_size))
        return results


def _yunet_detections(faces: np.ndarray | None, min_face_size: int) -> list[FaceDetection]:
    # Each row: x, y, w, h, then five (x, y) landmarks, then the score.
    if faces is None:
        return []
    detections = []
    for row in faces:
        x, y, w, h = (float(v) for v in row[:4])
        if min(w, h) < min_face_size:
            continue
        landmarks = tuple((float(row[4 + 2 * i]), float(row[5 + 2 * i])) for i in range(5))
        detections.append(FaceDetection(box=(x, y, x + w, y + h), score=float(row[14]), landmarks=landmarks))
    return detections


def _blazeface(config: BlazeFaceConfig) -> FaceDetector:
    # Imported here: the TFLite runtime loads only when this detector is chosen.
    from pipeline.detectors.blazeface import BlazeFaceDetector

    return BlazeFaceDetector(config)


# kind -> how to build it. A new detector is a module in pipeline/detectors/, its config in
# pipeline/config.py's AnyDetectorConfig union, and one entry here.
DETECTOR_BUILDERS: dict[str, Callable[[Any], FaceDetector]] = {
    "mtcnn": MTCNNDetector,
    "yunet": YuNetDetector,
    "blazeface": _blazeface,
}


def build_detector(config: DetectorConfig | BlazeFaceConfig) -> FaceDetector:
    return DETECTOR_BUILDERS[config.kind](config)
