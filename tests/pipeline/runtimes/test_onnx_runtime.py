"""The ONNX Runtime runtime on an export of the shipped model: the same logits as the PyTorch runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.checkpoint import CheckpointError, default_checkpoint_path
from pipeline.runtimes.base import RuntimeSettings
from pipeline.runtimes.onnx_runtime import OnnxClassifierRuntime
from pipeline.runtimes.torch_runtime import TorchClassifierRuntime
from pipeline.training.export import export

# The stated parity tolerance of an export (README, MODEL_CARD): max |logit| difference to PyTorch.
LOGIT_TOLERANCE = 1e-4


def settings(path: Path, threads: int = 1) -> RuntimeSettings:
    return RuntimeSettings(path=path, device="cpu", half=True, threads=threads)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    export(default_checkpoint_path(), "onnx", path)
    return path


def test_logits_match_the_torch_runtime_on_the_shipped_model(exported: Path) -> None:
    runtime = OnnxClassifierRuntime(settings(exported, threads=2))
    reference = TorchClassifierRuntime(settings(default_checkpoint_path()))
    assert runtime.metadata == reference.metadata
    assert runtime.session.get_session_options().intra_op_num_threads == 2
    metadata = runtime.metadata
    inputs = np.random.default_rng(0).standard_normal((9, metadata.channels, metadata.input_size, metadata.input_size)).astype(np.float32)

    logits, expected = runtime.logits(inputs), reference.logits(inputs)

    assert logits.shape == (9, len(metadata.classes)) and logits.dtype == np.float32
    diff = float(np.abs(logits - expected).max())
    assert diff < LOGIT_TOLERANCE, f"max |logit diff| {diff:.2e}"
    np.testing.assert_array_equal(runtime.logits(inputs), logits)  # deterministic compute


def test_a_file_that_is_not_an_onnx_export_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no ONNX model"):
        OnnxClassifierRuntime(settings(tmp_path / "missing.onnx"))
    with pytest.raises(CheckpointError, match="not a readable ONNX model"):
        OnnxClassifierRuntime(settings(default_checkpoint_path()))
