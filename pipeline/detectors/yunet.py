"""OpenCV's ``FaceDetectorYN`` (YuNet) with a user-supplied ONNX model, e.g. face_detection_yunet_2023mar.onnx."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from pipeline.config import YuNetConfig
from pipeline.detection import FaceDetection


class YuNetDetector:
    """YuNet has no batch axis in OpenCV's API, so a batch is a loop; it is still far cheaper
    than MTCNN on a CPU."""

    def __init__(self, config: YuNetConfig) -> None:
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
            results.append(yunet_detections(faces, self.config.min_face_size))
        return results


def yunet_detections(faces: np.ndarray | None, min_face_size: int) -> list[FaceDetection]:
    """OpenCV's rows (x, y, w, h, five (x, y) landmarks, score) as detections at least ``min_face_size`` on each side."""
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
