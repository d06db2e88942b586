import numpy as np
import pytest

from pipeline.config import YuNetConfig
from pipeline.detectors.yunet import YuNetDetector, yunet_detections


def test_yunet_rows_are_parsed_and_small_faces_filtered():
    rows = np.array(
        [
            [10, 20, 40, 50, 20, 30, 40, 30, 30, 40, 22, 55, 38, 55, 0.95],
            [0, 0, 5, 5, 1, 1, 2, 1, 2, 2, 1, 3, 2, 3, 0.99],
        ],
        np.float32,
    )
    (detection,) = yunet_detections(rows, min_face_size=10)
    assert detection.box == (10, 20, 50, 70)
    assert detection.score == pytest.approx(0.95)
    assert detection.landmarks is not None and detection.landmarks[0] == (20, 30)
    assert yunet_detections(None, 10) == []


def test_yunet_needs_an_existing_model_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="onnx_path"):
        YuNetDetector(YuNetConfig(onnx_path=tmp_path / "missing.onnx"))
