"""Which ``ClassifierRuntime`` a config names: one builder per ``classifier.backend``."""

from __future__ import annotations

from collections.abc import Callable

from pipeline.runtimes.base import ClassifierRuntime, RuntimeSettings
from pipeline.runtimes.onnx_runtime import OnnxClassifierRuntime
from pipeline.runtimes.torch_runtime import TorchClassifierRuntime

# A new runtime module adds its backend name here (and to pipeline.config.ClassifierConfig.backend,
# which is what rejects an unknown name at config time, naming classifier.backend).
RUNTIME_BUILDERS: dict[str, Callable[[RuntimeSettings], ClassifierRuntime]] = {
    "torch": TorchClassifierRuntime,
    "onnxruntime": OnnxClassifierRuntime,
}


def build_runtime(backend: str, settings: RuntimeSettings) -> ClassifierRuntime:
    """The runtime ``backend`` names, with its model loaded."""
    return RUNTIME_BUILDERS[backend](settings)
