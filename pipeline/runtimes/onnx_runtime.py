"""The ONNX Runtime runtime: a ``ferstream export --format onnx`` file, on CPU.

The export (``pipeline/training/export.py``) holds the network only; preprocessing stays
``pipeline.checkpoint.preprocess_crops``, and the file carries the checkpoint's metadata.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.checkpoint import ONNX_INPUT, ONNX_METADATA_KEY, ONNX_OUTPUT, CheckpointError, ModelMetadata
from pipeline.runtimes.base import ClassifierRuntime, RuntimeSettings

if TYPE_CHECKING:
    import onnxruntime


def load_onnx(path: str | Path, threads: int | None = None) -> tuple[onnxruntime.InferenceSession, ModelMetadata]:
    """An ONNX Runtime CPU session for a ``ferstream export --format onnx`` file, and its metadata.

    ``threads``: ONNX Runtime's intra-op threads (None: its default, one per physical core).
    Deterministic compute is requested and inter-op parallelism is off, so the same input gives
    the same output run after run.
    """
    import onnxruntime

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX model at {path}")
    options = onnxruntime.SessionOptions()
    options.use_deterministic_compute = True
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.inter_op_num_threads = 1
    if threads is not None:
        options.intra_op_num_threads = threads
    try:
        session = onnxruntime.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own untyped errors for unreadable models
        raise CheckpointError(f"{path} is not a readable ONNX model: {exc}") from exc
    raw = session.get_modelmeta().custom_metadata_map.get(ONNX_METADATA_KEY)
    if not raw:
        raise CheckpointError(f"{path} carries no {ONNX_METADATA_KEY!r} metadata; export it with `ferstream export --format onnx`")
    try:
        metadata = ModelMetadata.from_dict(json.loads(raw))
    except (ValueError, TypeError) as exc:  # CheckpointError is a ValueError, and so is JSONDecodeError
        raise CheckpointError(f"{path}: unusable {ONNX_METADATA_KEY!r} metadata: {exc}") from exc
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if [i.name for i in inputs] != [ONNX_INPUT] or ONNX_OUTPUT not in [o.name for o in outputs]:
        raise CheckpointError(f"{path}: expected input {ONNX_INPUT!r} and output {ONNX_OUTPUT!r}, not a ferstream export")
    expected = [metadata.channels, metadata.input_size, metadata.input_size]
    if list(inputs[0].shape[1:]) != expected:
        shape = " x ".join(map(str, expected))
        raise CheckpointError(f"{path}: input {ONNX_INPUT!r} has shape {inputs[0].shape}, its metadata says N x {shape}")
    return session, metadata


class OnnxClassifierRuntime(ClassifierRuntime):
    def __init__(self, settings: RuntimeSettings) -> None:
        # The config allows this backend only on CPU, so the preprocessed float32 batch goes in as it is.
        self.session, self.metadata = load_onnx(settings.path, threads=settings.threads)

    def logits(self, batch: np.ndarray) -> np.ndarray:
        (logits,) = self.session.run([ONNX_OUTPUT], {ONNX_INPUT: batch})
        return logits
