"""``ExpressionClassifier`` around a third runtime (a numpy test double): preprocessing, batching and
the softmax are the classifier's, whatever runs the network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.checkpoint import preprocess_crops
from pipeline.classification import ExpressionClassifier, crop_faces
from pipeline.config import ClassifierConfig
from pipeline.detection import FaceDetection
from pipeline.runtimes import builders
from pipeline.runtimes.base import RuntimeSettings
from tests.pipeline.conftest import CLASSES, make_metadata
from tests.pipeline.runtimes.fixed_logits_runtime import FixedLogitsRuntime

ROW = np.array([2.0, -1.0, 0.0, 3.5, 1.0, -2.0, 0.5], np.float32)


def softmax(row: np.ndarray) -> np.ndarray:
    exp = np.exp(row - row.max())
    return exp / exp.sum()


def frame_crops(n: int) -> list[np.ndarray]:
    image = np.random.default_rng(3).integers(0, 255, (240, 320, 3), dtype=np.uint8)
    detections = [FaceDetection(box=(10 + 25 * i, 10, 70 + 25 * i, 80), score=0.9) for i in range(n)]
    return crop_faces(image, detections, make_metadata(), 0.0)


def test_the_classifier_batches_preprocesses_and_softmaxes_around_any_runtime() -> None:
    metadata = make_metadata()
    runtime = FixedLogitsRuntime(metadata, ROW)
    classifier = ExpressionClassifier(ClassifierConfig(batch_size=3), runtime=runtime)
    assert classifier.classes == CLASSES and classifier.model_id == metadata.model_id
    crops = frame_crops(7)

    probabilities = classifier.predict(crops)

    assert probabilities.shape == (7, len(CLASSES)) and probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities, np.tile(softmax(ROW), (7, 1)), rtol=1e-6)
    # classifier.batch_size splits the crops; each batch is the preprocessed float32 N x C x S x S.
    assert [len(batch) for batch in runtime.batches] == [3, 3, 1]
    for batch in runtime.batches:
        assert batch.dtype == np.float32 and batch.shape[1:] == (1, 44, 44)
    np.testing.assert_array_equal(np.concatenate(runtime.batches), preprocess_crops(crops, metadata).numpy())
    assert classifier.predict([]).shape == (0, len(CLASSES))
    assert len(runtime.batches) == 3, "no runtime call for no crops"


def test_a_runtime_must_give_one_logit_per_class() -> None:
    with pytest.raises(ValueError, match="one logit per class"):
        FixedLogitsRuntime(make_metadata(), ROW[:3])


def test_the_backend_name_selects_the_runtime_through_the_builders(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    built: list[RuntimeSettings] = []

    def fixed(settings: RuntimeSettings) -> FixedLogitsRuntime:
        built.append(settings)
        return FixedLogitsRuntime(make_metadata(model_id="fixed"), ROW)

    monkeypatch.setitem(builders.RUNTIME_BUILDERS, "onnxruntime", fixed)
    classifier = ExpressionClassifier(ClassifierConfig(backend="onnxruntime", checkpoint=tmp_path / "m.onnx"))

    assert isinstance(classifier.runtime, FixedLogitsRuntime) and classifier.model_id == "fixed"
    (settings,) = built
    assert settings.path == tmp_path / "m.onnx" and settings.device == "cpu" and settings.threads >= 1
