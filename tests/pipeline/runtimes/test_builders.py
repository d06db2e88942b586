"""Selecting a classifier runtime: one builder per ``classifier.backend``, an unknown one refused at config time."""

from __future__ import annotations

import typing

import pytest

from pipeline.config import ClassifierConfig, ConfigError, PipelineConfig, parse_config
from pipeline.runtimes.builders import RUNTIME_BUILDERS
from pipeline.runtimes.onnx_runtime import OnnxClassifierRuntime
from pipeline.runtimes.torch_runtime import TorchClassifierRuntime


def test_every_configurable_backend_has_a_builder() -> None:
    backends = typing.get_args(ClassifierConfig.model_fields["backend"].annotation)
    assert set(backends) == set(RUNTIME_BUILDERS) == {"torch", "onnxruntime"}
    assert RUNTIME_BUILDERS["torch"] is TorchClassifierRuntime and RUNTIME_BUILDERS["onnxruntime"] is OnnxClassifierRuntime


def test_an_unknown_backend_fails_at_config_time_naming_the_field() -> None:
    with pytest.raises(ConfigError, match="cfg.yaml: classifier.backend: ") as caught:
        parse_config(PipelineConfig, {"classifier": {"backend": "tensorrt"}}, "cfg.yaml")
    assert "'torch'" in str(caught.value) and "'onnxruntime'" in str(caught.value)
