"""Expression classification: crop and align faces the way the model was trained, predict in batches.

The face crop is a single affine warp per face (rotate the eyes level, enlarge the box by the
model's ``face_margin``, resize to the model's ``resize_to``, replicate borders where the box
leaves the frame). The crops are tiny, which is what travels to a classifier replica.

:func:`crop_faces` is the one crop, for the single-process runner and the Serve ingest alike.
Cropping, :func:`preprocess_crops`, batching and the softmax are the same for every backend; only
the network's forward call differs, and that is a ``pipeline.runtimes`` ``ClassifierRuntime``
(``classifier.backend``: ``torch`` runs a ``.pt`` checkpoint, ``onnxruntime`` its
``ferstream export --format onnx`` file on CPU).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np
import torch

from pipeline.checkpoint import CheckpointError, ModelMetadata, default_checkpoint_path, preprocess_crops
from pipeline.config import BaseDetectorConfig, ClassifierConfig
from pipeline.detection import FaceDetection
from pipeline.runtimes.base import ClassifierRuntime, RuntimeSettings
from pipeline.runtimes.builders import build_runtime


def face_crop_transform(detection: FaceDetection, margin: float, size: int) -> np.ndarray:
    """The 2x3 affine matrix mapping frame pixels to a ``size`` x ``size`` aligned face crop."""
    x1, y1, x2, y2 = detection.box
    center_x, center_y = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    side = max(x2 - x1, y2 - y1) * (1.0 + 2.0 * margin)
    angle = 0.0
    if detection.landmarks is not None and len(detection.landmarks) >= 2:
        (left_x, left_y), (right_x, right_y) = detection.landmarks[0], detection.landmarks[1]
        # Eyes in image order: the angle that brings them level.
        angle = math.degrees(math.atan2(right_y - left_y, right_x - left_x))
    scale = size / max(side, 1.0)
    matrix = cv2.getRotationMatrix2D((center_x, center_y), angle, scale)
    # getRotationMatrix2D keeps the centre fixed; move it to the middle of the crop.
    matrix[0, 2] += size / 2.0 - center_x
    matrix[1, 2] += size / 2.0 - center_y
    return matrix


def crop_margin(detector: BaseDetectorConfig, metadata: ModelMetadata) -> float:
    """The margin crops of this detector's boxes get: the detector's own calibration, else the checkpoint's."""
    return metadata.face_margin if detector.face_margin is None else detector.face_margin


def crop_faces(image: np.ndarray, detections: Sequence[FaceDetection], metadata: ModelMetadata, margin: float) -> list[np.ndarray]:
    """Aligned, padded face crops (``resize_to`` square; grayscale when the model is) from one frame, each box
    enlarged by ``margin`` on each side (:func:`crop_margin`)."""
    source = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if metadata.grayscale and image.ndim == 3 and detections else image
    size = metadata.resize_to
    return [
        cv2.warpAffine(
            source,
            face_crop_transform(detection, margin, size),
            (size, size),
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_REPLICATE,
        )
        for detection in detections
    ]


class ExpressionClassifier:
    """Predicts class probabilities for face crops in batches of ``classifier.batch_size``.

    Preprocessing (:func:`preprocess_crops`), batching and the softmax are here, the same for every
    backend; the forward call is the ``ClassifierRuntime`` that ``classifier.backend`` names
    (``pipeline.runtimes``), or ``runtime`` when one is given already loaded.
    """

    def __init__(self, config: ClassifierConfig, runtime: ClassifierRuntime | None = None) -> None:
        self.config = config
        if runtime is None:
            # As many threads as torch uses: Ray sets OMP_NUM_THREADS to a replica's num_cpus, which
            # torch follows and ONNX Runtime does not.
            settings = RuntimeSettings(
                path=config.checkpoint_path or default_checkpoint_path(),
                device=config.device,
                half=config.half,
                threads=torch.get_num_threads(),
            )
            try:
                runtime = build_runtime(config.backend, settings)
            except (FileNotFoundError, CheckpointError) as exc:
                raise type(exc)(f"classifier.checkpoint ({config.backend} backend): {exc}") from exc
        self.runtime = runtime
        self.metadata: ModelMetadata = runtime.metadata

    @property
    def classes(self) -> tuple[str, ...]:
        return self.metadata.classes

    @property
    def model_id(self) -> str:
        return self.metadata.model_id

    @torch.inference_mode()
    def predict(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """Probabilities, shape (len(crops), len(classes)), float32, for crops from :func:`crop_faces` (or any uint8 face images)."""
        if not crops:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        outputs = []
        for start in range(0, len(crops), self.config.batch_size):
            # .numpy() and from_numpy share memory: the runtime boundary copies nothing.
            batch = preprocess_crops(crops[start : start + self.config.batch_size], self.metadata).numpy()
            outputs.append(torch.softmax(torch.from_numpy(self.runtime.logits(batch)), dim=1).numpy())
        return np.concatenate(outputs)
