import math

import numpy as np
import pytest
import torch

from pipeline.architectures import build_model
from pipeline.checkpoint import ModelMetadata, default_checkpoint_path, save_checkpoint
from pipeline.classification import ExpressionClassifier, crop_faces, face_crop_transform
from pipeline.config import ClassifierConfig
from pipeline.detection import FaceDetection
from tests.pipeline.conftest import CLASSES, make_metadata


def metadata(margin: float = 0.0, grayscale: bool = True) -> ModelMetadata:
    channels = 1 if grayscale else 3
    return make_metadata(
        arch="compact",
        input_size=48,
        grayscale=grayscale,
        mean=(0.5,) * channels,
        std=(0.25,) * channels,
        face_margin=margin,
        model_id="test-model",
        metrics={},
    )


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "model.pt"
    save_checkpoint(path, build_model("compact", len(CLASSES), in_channels=1), metadata(margin=0.1))
    return path


def test_transform_maps_box_corners_to_crop_corners():
    detection = FaceDetection(box=(100, 50, 200, 150), score=1.0)
    matrix = face_crop_transform(detection, margin=0.0, size=48)
    corners = np.array([[100, 50, 1], [200, 150, 1]], float) @ matrix.T
    np.testing.assert_allclose(corners, [[0, 0], [48, 48]], atol=1e-6)


def test_transform_levels_tilted_eyes():
    # Eyes on a 30 degree line through the box centre.
    c, r = (150.0, 100.0), 20.0
    dx, dy = r * math.cos(math.radians(30)), r * math.sin(math.radians(30))
    detection = FaceDetection(box=(100, 50, 200, 150), score=1.0, landmarks=((c[0] - dx, c[1] - dy), (c[0] + dx, c[1] + dy)))
    matrix = face_crop_transform(detection, margin=0.0, size=48)
    left, right = np.array([[c[0] - dx, c[1] - dy, 1], [c[0] + dx, c[1] + dy, 1]]) @ matrix.T
    assert left[1] == pytest.approx(right[1], abs=1e-6), "eyes are level in the crop"
    assert right[0] > left[0]


def test_crops_are_gray_padded_and_sized_by_the_model():
    image = np.zeros((100, 100, 3), np.uint8)
    image[:, :50] = (0, 0, 255)  # left half red in BGR
    # A box hanging over the left edge: the outside is replicated, not black garbage.
    (crop,) = crop_faces(image, [FaceDetection(box=(-20, 20, 40, 80), score=1.0)], metadata())
    assert crop.shape == (48, 48) and crop.dtype == np.uint8
    assert crop.min() == crop.max() == round(0.299 * 255)
    assert crop_faces(image, [], metadata()) == []


def test_classifier_predicts_probability_rows_in_batches(checkpoint):
    classifier = ExpressionClassifier(ClassifierConfig(checkpoint=checkpoint, batch_size=3))
    assert classifier.classes == CLASSES and classifier.model_id == "test-model"
    image = np.random.default_rng(0).integers(0, 255, (240, 320, 3), dtype=np.uint8)
    detections = [FaceDetection(box=(10 + 30 * i, 10, 70 + 30 * i, 80), score=0.99) for i in range(7)]
    crops = classifier.crop(image, detections)
    assert all(crop.shape == (48, 48) for crop in crops)
    probabilities = classifier.predict(crops)
    assert probabilities.shape == (7, len(CLASSES)) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    # Batching must not change results.
    single = np.concatenate([classifier.predict([crop]) for crop in crops])
    np.testing.assert_allclose(single, probabilities, atol=1e-5)
    assert classifier.predict([]).shape == (0, len(CLASSES))


def test_cuda_request_without_cuda_fails_clearly(checkpoint):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="classifier.device"):
        ExpressionClassifier(ClassifierConfig(checkpoint=checkpoint, device="cuda"))


def test_the_default_model_is_shipped_and_loads():
    assert default_checkpoint_path().is_file(), "the package ships a default expression model"
    classifier = ExpressionClassifier(ClassifierConfig())
    assert set(classifier.classes) == set(CLASSES)
    assert classifier.metadata.metrics.get("accuracy", 0) > 0.5, "the shipped model is trained, with its validation accuracy recorded"
