"""The PyTorch runtime on the shipped model: the checkpoint's network, its metadata, channels_last on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.checkpoint import default_checkpoint_path, load_checkpoint
from pipeline.runtimes.base import RuntimeSettings
from pipeline.runtimes.torch_runtime import TorchClassifierRuntime


def shipped(device: str = "cpu", half: bool = True) -> RuntimeSettings:
    return RuntimeSettings(path=default_checkpoint_path(), device=device, half=half, threads=torch.get_num_threads())


def batch(n: int, side: int, channels: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, channels, side, side)).astype(np.float32)


def test_logits_are_the_checkpoints_network_on_the_batch() -> None:
    runtime = TorchClassifierRuntime(shipped())
    model, metadata = load_checkpoint(default_checkpoint_path())
    assert runtime.metadata == metadata
    # float32 on CPU, whatever ``half`` says: float16 is slower there.
    assert runtime.dtype == torch.float32 and runtime.device.type == "cpu"
    inputs = batch(5, metadata.input_size, metadata.channels)

    logits = runtime.logits(inputs)

    assert logits.shape == (5, len(metadata.classes)) and logits.dtype == np.float32
    with torch.inference_mode():
        expected = model(torch.from_numpy(inputs)).numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4)
    np.testing.assert_array_equal(logits.argmax(1), expected.argmax(1))
    np.testing.assert_array_equal(runtime.logits(inputs), logits)


def test_cuda_without_cuda_names_the_field() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match="classifier.device is 'cuda'"):
        TorchClassifierRuntime(shipped(device="cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("half", [True, False])
def test_cuda_runs_float16_when_asked_and_agrees_with_cpu(half: bool) -> None:
    runtime, reference = TorchClassifierRuntime(shipped(device="cuda", half=half)), TorchClassifierRuntime(shipped())
    assert runtime.dtype == (torch.float16 if half else torch.float32)
    inputs = batch(33, runtime.metadata.input_size, runtime.metadata.channels)

    logits, expected = runtime.logits(inputs), reference.logits(inputs)

    assert logits.shape == expected.shape and logits.dtype == np.float32
    # float16 keeps about 3 significant digits of logits of magnitude ~10.
    np.testing.assert_allclose(logits, expected, atol=5e-2 if half else 1e-3)
