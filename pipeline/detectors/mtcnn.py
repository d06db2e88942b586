"""facenet-pytorch's MTCNN (its weights ship inside the wheel, so nothing is downloaded)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.config import MTCNNConfig
from pipeline.detection import FaceDetection


class MTCNNDetector:
    """Images of the same size are stacked into one batched forward pass, which is what makes a
    GPU worthwhile; different sizes (cameras with other resolutions) form separate batches."""

    def __init__(self, config: MTCNNConfig) -> None:
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
                results[index] = mtcnn_detections(boxes[slot], scores[slot], points[slot], self.config.score_threshold)
        return results


def mtcnn_detections(
    boxes: np.ndarray | None, scores: np.ndarray | None, points: np.ndarray | None, threshold: float
) -> list[FaceDetection]:
    """facenet-pytorch's per-image outputs (None when it found nothing) as detections scoring at least ``threshold``."""
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
