"""A test double ``ClassifierRuntime``: plain numpy, no model file, the same logits row for every face.

It is a module of its own on purpose: a third runtime needs a ``ClassifierRuntime`` subclass and
nothing in ``ExpressionClassifier`` changes. It records each batch it is given.
"""

from __future__ import annotations

import numpy as np

from pipeline.checkpoint import ModelMetadata
from pipeline.runtimes.base import ClassifierRuntime


class FixedLogitsRuntime(ClassifierRuntime):
    def __init__(self, metadata: ModelMetadata, row: np.ndarray) -> None:
        if row.shape != (len(metadata.classes),):
            raise ValueError(f"one logit per class ({len(metadata.classes)}), got shape {row.shape}")
        self.metadata = metadata
        self.row = row.astype(np.float32)
        self.batches: list[np.ndarray] = []

    def logits(self, batch: np.ndarray) -> np.ndarray:
        self.batches.append(batch.copy())
        return np.tile(self.row, (len(batch), 1))
