"""Expression classification: crop and align faces the way the model was trained, predict in batches.

The face crop is a single affine warp per face (rotate the eyes level, enlarge the box by the
model's ``face_margin``, resize to the model's ``resize_to``, replicate borders where the box
leaves the frame). The crops are tiny, which is what travels to a classifier replica.

Two backends (``classifier.backend``): ``torch`` runs a ``.pt`` checkpoint, ``onnxruntime`` runs
its ``ferstream export --format onnx`` file on CPU. Cropping and :func:`preprocess_crops` are the
same for both; only the network's forward call differs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import cv2
import numpy as np
import torch

from pipeline.checkpoint import (
    ONNX_INPUT,
    ONNX_OUTPUT,
    CheckpointError,
    ModelMetadata,
    default_checkpoint_path,
    load_checkpoint,
    load_onnx,
    preprocess_crops,
)
from pipeline.config import ClassifierConfig
from pipeline.detection import FaceDetection

if TYPE_CHECKING:
    import onnxruntime


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


def crop_faces(image: np.ndarray, detections: Sequence[FaceDetection], metadata: ModelMetadata) -> list[np.ndarray]:
    """Aligned, padded face crops (``resize_to`` square; grayscale when the model is) from one frame."""
    source = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if metadata.grayscale and image.ndim == 3 and detections else image
    size = metadata.resize_to
    return [
        cv2.warpAffine(
            source,
            face_crop_transform(detection, metadata.face_margin, size),
            (size, size),
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_REPLICATE,
        )
        for detection in detections
    ]


class ExpressionClassifier:
    """Loads a ferstream model (``.pt`` checkpoint, or its ONNX export) and predicts class probabilities for face crops in batches."""

    def __init__(self, config: ClassifierConfig) -> None:
        if config.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("classifier.device is 'cuda' but CUDA is not available")
        path = config.checkpoint_path or default_checkpoint_path()
        self.config = config
        self.device = torch.device(config.device)
        self.model: torch.nn.Module | None = None
        self.session: onnxruntime.InferenceSession | None = None
        try:
            if config.backend == "onnxruntime":
                # The config allows this backend only on CPU, so the preprocessed float32 batch goes in as it is.
                # As many threads as torch uses: Ray sets OMP_NUM_THREADS to a replica's num_cpus, which
                # torch follows and ONNX Runtime does not.
                self.session, self.metadata = load_onnx(path, threads=torch.get_num_threads())
                self.dtype = torch.float32
            else:
                model, self.metadata = load_checkpoint(path, map_location=self.device)
                # float16 only where it is fast and supported: CUDA. On CPU it is slower than float32.
                self.dtype = torch.float16 if config.half and self.device.type == "cuda" else torch.float32
                # channels_last lets oneDNN/cuDNN pick their fast convolution kernels (about 1.5x on this
                # project's 2-core CPU, benchmarks/classifier_throughput.py).
                self.model = model.to(self.device, dtype=self.dtype, memory_format=torch.channels_last).eval()
        except (FileNotFoundError, CheckpointError) as exc:
            raise type(exc)(f"classifier.checkpoint ({config.backend} backend): {exc}") from exc

    @property
    def classes(self) -> tuple[str, ...]:
        return self.metadata.classes

    @property
    def model_id(self) -> str:
        return self.metadata.model_id

    def crop(self, image: np.ndarray, detections: Sequence[FaceDetection]) -> list[np.ndarray]:
        return crop_faces(image, detections, self.metadata)

    @torch.inference_mode()
    def predict(self, crops: Sequence[np.ndarray]) -> np.ndarray:
        """Probabilities, shape (len(crops), len(classes)), float32."""
        if not crops:
            return np.zeros((0, len(self.classes)), dtype=np.float32)
        outputs = []
        for start in range(0, len(crops), self.config.batch_size):
            batch = preprocess_crops(crops[start : start + self.config.batch_size], self.metadata)
            outputs.append(torch.softmax(self._logits(batch).float(), dim=1).cpu().numpy())
        return np.concatenate(outputs)

    def _logits(self, batch: torch.Tensor) -> torch.Tensor:
        """The network's forward call on one preprocessed N x C x S x S float32 CPU batch: the only backend-specific step."""
        if self.session is not None:
            (logits,) = self.session.run([ONNX_OUTPUT], {ONNX_INPUT: batch.numpy()})
            return torch.from_numpy(logits)
        inputs = batch.to(self.device, dtype=self.dtype, non_blocking=True).contiguous(memory_format=torch.channels_last)
        return self.model(inputs)
