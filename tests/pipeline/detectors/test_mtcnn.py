import numpy as np
import pytest

from pipeline.config import MTCNNConfig
from pipeline.detection import detect_frames
from pipeline.detectors.mtcnn import MTCNNDetector, mtcnn_detections
from tests.media import decode_bgr_frames


@pytest.fixture(scope="module")
def mtcnn() -> MTCNNDetector:
    return MTCNNDetector(MTCNNConfig())


def test_no_boxes_and_low_scores_give_no_detections():
    assert mtcnn_detections(None, None, None, 0.9) == []
    boxes = np.array([[0, 0, 10, 10], [5, 5, 30, 30]], np.float32)
    (kept,) = mtcnn_detections(boxes, np.array([0.5, 0.95]), None, 0.9)
    assert kept.box == (5.0, 5.0, 30.0, 30.0) and kept.landmarks is None


def test_mtcnn_finds_nothing_in_a_blank_frame(mtcnn):
    assert mtcnn.detect_batch([np.full((240, 320, 3), 127, np.uint8)]) == [[]]


@pytest.mark.parametrize(("clip", "people"), [("head-pose-face-detection-female-and-male", 2), ("face-demographics-walking-and-pause", 3)])
def test_mtcnn_finds_the_people_in_the_shared_clips(mtcnn, shared_clips, clip, people):
    frames = decode_bgr_frames(shared_clips[clip])
    counts = []
    for start in range(0, len(frames), 8):
        batch = frames[start : start + 8]
        counts.extend(len(found) for found in detect_frames(mtcnn, batch, detection_size=640))
    hits = sum(count == people for count in counts)
    assert hits >= 0.8 * len(frames), f"{people} faces in only {hits}/{len(frames)} frames: {counts}"
