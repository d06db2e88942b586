"""The interface between ``ExpressionClassifier`` and whatever runs the network: a ``ClassifierRuntime``.

A runtime loads one model file, says what the file's metadata is (the preprocessing, the classes),
and turns a preprocessed float32 batch into logits. A new runtime (TensorRT, OpenVINO) is a new
module in this package with one ``ClassifierRuntime`` subclass, a name in ``pipeline.config``'s
``ClassifierConfig.backend`` and one line in ``pipeline.runtimes.builders.RUNTIME_BUILDERS``.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.checkpoint import ModelMetadata


@dataclass(frozen=True)
class RuntimeSettings:
    """What a runtime needs to load its model: everything of ``classifier`` but the batching."""

    path: Path  # the model file (``~`` already expanded; the shipped default when the config names none)
    device: str  # "cpu" or "cuda"; a runtime that cannot use the device raises at load time
    half: bool  # float16 where the runtime and device make it fast (CUDA); ignored elsewhere
    threads: int  # intra-op CPU threads


class ClassifierRuntime(abc.ABC):
    """Runs one loaded expression network. Called from one thread at a time per instance."""

    #: The model file's metadata (classes, input size, normalisation), read at load time.
    metadata: ModelMetadata

    @abc.abstractmethod
    def logits(self, batch: np.ndarray) -> np.ndarray:
        """float32 N x C x S x S (``pipeline.checkpoint.preprocess_crops``, on the CPU) -> float32 N x len(classes) logits."""
