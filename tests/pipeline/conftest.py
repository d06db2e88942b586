"""Helpers shared by the pipeline tests."""

from typing import Any

from pipeline.checkpoint import ModelMetadata

CLASSES = ("angry", "disgust", "fear", "happy", "neutral", "sad", "surprise")


def make_metadata(**overrides: Any) -> ModelMetadata:
    """A valid ModelMetadata for a small test model; keyword arguments replace fields."""
    values = dict(
        model_id="unit",
        arch="tiny",
        arch_kwargs={},
        classes=CLASSES,
        input_size=44,
        resize_to=48,
        grayscale=True,
        mean=(0.5,),
        std=(0.25,),
        face_margin=0.15,
        metrics={"accuracy": 0.5},
    )
    values.update(overrides)
    return ModelMetadata(**values)
