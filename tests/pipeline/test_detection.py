import numpy as np
import pytest

from pipeline.config import MTCNNConfig, YuNetConfig
from pipeline.detection import DETECTOR_CLASSES, FaceDetection, build_detector, detect_frames, downscale_for_detection, scale_detections
from tests.media import decode_bgr_frames


@pytest.fixture(scope="module")
def mtcnn():
    return build_detector(MTCNNConfig())


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


def test_every_detector_kind_has_a_class_and_is_built_by_its_kind(tmp_path):
    from pipeline.config import AnyDetectorConfig

    kinds = {member.model_fields["kind"].default for member in AnyDetectorConfig.__origin__.__args__}
    assert kinds == set(DETECTOR_CLASSES)
    with pytest.raises(FileNotFoundError, match="onnx_path"):
        build_detector(YuNetConfig(onnx_path=tmp_path / "missing.onnx"))


def test_downscaled_detection_maps_back_to_full_frame_boxes(mtcnn, shared_clips):
    frame = decode_bgr_frames(shared_clips["face-demographics-walking-and-pause"])[0]
    full = sorted(mtcnn.detect_batch([frame])[0], key=lambda d: d.box[0])
    small = sorted(detect_frames(mtcnn, [frame], detection_size=320)[0], key=lambda d: d.box[0])
    assert len(full) == len(small) == 3
    for a, b in zip(full, small, strict=True):
        assert np.allclose(a.box, b.box, atol=12), (a.box, b.box)
