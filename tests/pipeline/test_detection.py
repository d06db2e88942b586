from pathlib import Path

import av
import numpy as np
import pytest

from pipeline.config import DetectorConfig
from pipeline.detection import (
    FaceDetection,
    MTCNNDetector,
    YuNetDetector,
    _yunet_detections,
    build_detector,
    detect_frames,
    downscale_for_detection,
    scale_detections,
)


def decode_bgr_frames(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="bgr24") for frame in container.decode(video=0)]


@pytest.fixture(scope="module")
def mtcnn() -> MTCNNDetector:
    return MTCNNDetector(DetectorConfig())


def test_downscale_keeps_aspect_and_never_upscales():
    image = np.zeros((1080, 1920, 3), np.uint8)
    small = downscale_for_detection(image, 640)
    assert small.image.shape == (360, 640, 3)
    assert small.scale == pytest.approx(3.0)
    tiny = np.zeros((100, 200, 3), np.uint8)
    assert downscale_for_detection(tiny, 640).image is tiny


def test_scale_detections_maps_boxes_and_landmarks_back():
    detection = FaceDetection(box=(10, 20, 30, 40), score=0.9, landmarks=((12, 25), (28, 25), (20, 30), (14, 35), (26, 35)))
    (scaled,) = scale_detections([detection], 2.0)
    assert scaled.box == (20, 40, 60, 80)
    assert scaled.landmarks is not None and scaled.landmarks[1] == (56, 50)
    assert scaled.score == 0.9


def test_yunet_rows_are_parsed_and_small_faces_filtered():
    rows = np.array(
        [
            [10, 20, 40, 50, 20, 30, 40, 30, 30, 40, 22, 55, 38, 55, 0.95],
            [0, 0, 5, 5, 1, 1, 2, 1, 2, 2, 1, 3, 2, 3, 0.99],
        ],
        np.float32,
    )
    (detection,) = _yunet_detections(rows, min_face_size=10)
    assert detection.box == (10, 20, 50, 70)
    assert detection.score == pytest.approx(0.95)
    assert detection.landmarks is not None and detection.landmarks[0] == (20, 30)
    assert _yunet_detections(None, 10) == []


def test_yunet_needs_an_existing_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="onnx_path"):
        YuNetDetector(DetectorConfig(kind="yunet", onnx_path=tmp_path / "missing.onnx"))
    with pytest.raises(FileNotFoundError):
        build_detector(DetectorConfig(kind="yunet", onnx_path=tmp_path / "missing.onnx"))


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


def test_downscaled_detection_maps_back_to_full_frame_boxes(mtcnn, shared_clips):
    frame = decode_bgr_frames(shared_clips["face-demographics-walking-and-pause"])[0]
    full = sorted(mtcnn.detect_batch([frame])[0], key=lambda d: d.box[0])
    small = sorted(detect_frames(mtcnn, [frame], detection_size=320)[0], key=lambda d: d.box[0])
    assert len(full) == len(small) == 3
    for a, b in zip(full, small, strict=True):
        assert np.allclose(a.box, b.box, atol=12), (a.box, b.box)
