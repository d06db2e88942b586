import math

import numpy as np
import onnx
import pytest
import torch

from pipeline.architectures import build_model
from pipeline.checkpoint import ONNX_METADATA_KEY, CheckpointError, ModelMetadata, default_checkpoint_path, save_checkpoint
from pipeline.classification import ExpressionClassifier, crop_faces, crop_margin, face_crop_transform
from pipeline.config import BlazeFaceConfig, ClassifierConfig, MTCNNConfig
from pipeline.detection import FaceDetection
from pipeline.runtimes.onnx_runtime import OnnxClassifierRuntime
from pipeline.training.export import export
from tests.pipeline.conftest import CLASSES, make_metadata

# ONNX Runtime backend vs PyTorch backend, on the same crops: max |probability| difference.
PROBABILITY_TOLERANCE = 1e-5


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
    (crop,) = crop_faces(image, [FaceDetection(box=(-20, 20, 40, 80), score=1.0)], metadata(), 0.0)
    assert crop.shape == (48, 48) and crop.dtype == np.uint8
    assert crop.min() == crop.max() == round(0.299 * 255)
    assert crop_faces(image, [], metadata(), 0.0) == []


def test_the_crop_margin_is_the_detectors_own_else_the_checkpoints():
    model = metadata()
    assert crop_margin(MTCNNConfig(), model) == model.face_margin
    assert crop_margin(BlazeFaceConfig(), model) == BlazeFaceConfig().face_margin == 0.1
    assert crop_margin(BlazeFaceConfig(face_margin=None), model) == model.face_margin
    # A larger margin takes a wider view around the same box: a box-sized white square fills less of the crop.
    image = np.zeros((200, 200, 3), np.uint8)
    image[70:130, 70:130] = 255
    box = [FaceDetection(box=(70, 70, 130, 130), score=1.0)]
    tight, loose = crop_faces(image, box, model, 0.0)[0], crop_faces(image, box, model, 0.25)[0]
    assert (tight > 128).mean() > 0.95 and 0.3 < (loose > 128).mean() < 0.5


def test_classifier_predicts_probability_rows_in_batches(checkpoint):
    classifier = ExpressionClassifier(ClassifierConfig(checkpoint=checkpoint, batch_size=3))
    assert classifier.classes == CLASSES and classifier.model_id == "test-model"
    image = np.random.default_rng(0).integers(0, 255, (240, 320, 3), dtype=np.uint8)
    detections = [FaceDetection(box=(10 + 30 * i, 10, 70 + 30 * i, 80), score=0.99) for i in range(7)]
    crops = crop_faces(image, detections, classifier.metadata, 0.0)
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


def face_crops(classifier: ExpressionClassifier, n: int, seed: int) -> list[np.ndarray]:
    """The service's crops (aligned, padded, from a BGR frame) plus raw gray and BGR crops of assorted sizes."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)
    detections = [FaceDetection(box=(10 + 20 * i, 10 + 5 * i, 70 + 20 * i, 80 + 5 * i), score=0.99) for i in range(n)]
    crops = crop_faces(image, detections, classifier.metadata, 0.0)
    for i in range(n):
        side = int(rng.integers(20, 160))
        crops.append(rng.integers(0, 256, (side, side) if i % 2 else (side, side, 3), dtype=np.uint8))
    return crops


def assert_backends_agree(checkpoint_path, tmp_path, batch_size: int) -> None:
    onnx_path = tmp_path / "exported" / "model.onnx"
    export(checkpoint_path, "onnx", onnx_path)
    reference = ExpressionClassifier(ClassifierConfig(checkpoint=checkpoint_path, batch_size=batch_size))
    classifier = ExpressionClassifier(ClassifierConfig(backend="onnxruntime", checkpoint=onnx_path, batch_size=batch_size))
    assert isinstance(classifier.runtime, OnnxClassifierRuntime), "the onnxruntime backend does not run PyTorch"
    assert classifier.metadata == reference.metadata
    crops = face_crops(reference, 9, seed=1)
    # One crop path for both backends (it depends only on the metadata, which the export carries).
    for ours, theirs in zip(face_crops(classifier, 9, seed=1), crops, strict=True):
        np.testing.assert_array_equal(ours, theirs)
    expected, probabilities = reference.predict(crops), classifier.predict(crops)
    assert probabilities.shape == expected.shape and probabilities.dtype == np.float32
    diff = float(np.abs(probabilities - expected).max())
    assert diff < PROBABILITY_TOLERANCE, f"max |probability diff| {diff:.2e}"
    np.testing.assert_array_equal(probabilities.argmax(1), expected.argmax(1))
    # Deterministic, and batching does not change results.
    np.testing.assert_array_equal(classifier.predict(crops), probabilities)
    np.testing.assert_allclose(np.concatenate([classifier.predict([crop]) for crop in crops]), probabilities, atol=1e-6)
    assert classifier.predict([]).shape == (0, len(classifier.classes))
    print(f"{reference.model_id}: max |probability diff| onnxruntime vs torch {diff:.2e}")


@pytest.mark.parametrize("grayscale", [True, False])
def test_onnxruntime_backend_matches_the_torch_backend(tmp_path, grayscale):
    torch.manual_seed(0)
    path = tmp_path / "model.pt"
    channels = 1 if grayscale else 3
    model = build_model("compact", len(CLASSES), in_channels=channels)
    with torch.no_grad():
        # An untrained net's probabilities are nearly uniform, which would hide a difference: sharpen them.
        [head for head in model.modules() if isinstance(head, torch.nn.Linear)][-1].weight.mul_(50)
    save_checkpoint(path, model, metadata(margin=0.1, grayscale=grayscale))
    assert_backends_agree(path, tmp_path, batch_size=4)


def test_onnxruntime_backend_matches_the_torch_backend_on_the_shipped_model(tmp_path):
    assert_backends_agree(default_checkpoint_path(), tmp_path, batch_size=64)


def test_onnxruntime_backend_names_the_field_and_file_when_the_model_is_unusable(checkpoint, tmp_path):
    missing = tmp_path / "nope.onnx"
    with pytest.raises(FileNotFoundError, match=r"classifier\.checkpoint.*nope\.onnx"):
        ExpressionClassifier(ClassifierConfig(backend="onnxruntime", checkpoint=missing))
    # A valid ONNX model, but not a ferstream export: no metadata.
    exported = tmp_path / "model.onnx"
    export(checkpoint, "onnx", exported)
    proto = onnx.load(str(exported))
    del proto.metadata_props[:]
    bare = tmp_path / "bare.onnx"
    onnx.save(proto, str(bare))
    with pytest.raises(CheckpointError, match=rf"classifier\.checkpoint.*bare\.onnx.*{ONNX_METADATA_KEY}"):
        ExpressionClassifier(ClassifierConfig(backend="onnxruntime", checkpoint=bare))
    # A PyTorch checkpoint given to the onnxruntime backend.
    with pytest.raises(CheckpointError, match=r"classifier\.checkpoint.*model\.pt.*not a readable ONNX model"):
        ExpressionClassifier(ClassifierConfig(backend="onnxruntime", checkpoint=checkpoint))


def test_checkpoint_path_expands_the_home_directory(checkpoint, monkeypatch):
    monkeypatch.setenv("HOME", str(checkpoint.parent))
    classifier = ExpressionClassifier(ClassifierConfig(checkpoint="~/model.pt"))
    assert classifier.model_id == "test-model"
