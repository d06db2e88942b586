"""One dummy batch through each model before the first real frame.

A model's first calls are slow (PyTorch allocates and picks its kernels then): measured on this
project's 2-core CPU, MTCNN took 1.0 to 1.6 s for each of the first three frames of a clip, and
0.08 to 0.15 s after one warm-up call on a noise frame. Without warming, the first frames of a
camera come out seconds late, or (under Serve) time out, and the first events lag for no reason
a user can see.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from pipeline.classification import ExpressionClassifier, crop_faces
from pipeline.detection import FaceDetection, FaceDetector, detect_frames

log = logging.getLogger("ferstream.warmup")

# A 16:9 frame; the detector sees it downscaled to its detection_size, as it sees camera frames.
WARMUP_FRAME_SHAPE = (360, 640, 3)


def _noise_frame() -> np.ndarray:
    # Noise rather than black: some detectors skip their later stages on an empty image.
    return np.random.default_rng(0).integers(0, 256, WARMUP_FRAME_SHAPE, dtype=np.uint8)


def warm_up_detector(detector: FaceDetector, detection_size: int) -> float:
    """Run the detector once on a noise frame; returns the seconds it took."""
    started = time.perf_counter()
    detect_frames(detector, [_noise_frame()], detection_size)
    elapsed = time.perf_counter() - started
    log.info("face detector warmed up in %.2f s", elapsed)
    return elapsed


def warm_up_classifier(classifier: ExpressionClassifier) -> float:
    """Classify one crop of a noise frame (a made-up face box); returns the seconds it took."""
    height, width = WARMUP_FRAME_SHAPE[:2]
    face = FaceDetection(box=(width * 0.4, height * 0.3, width * 0.6, height * 0.7), score=1.0)
    started = time.perf_counter()
    classifier.predict(crop_faces(_noise_frame(), [face], classifier.metadata, classifier.metadata.face_margin))
    elapsed = time.perf_counter() - started
    log.info("expression classifier warmed up in %.2f s", elapsed)
    return elapsed
