"""The PyTorch runtime: a ``.pt`` checkpoint (``pipeline.checkpoint``) on CPU or CUDA, float16 on CUDA."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.checkpoint import load_checkpoint
from pipeline.runtimes.base import ClassifierRuntime, RuntimeSettings


class TorchClassifierRuntime(ClassifierRuntime):
    def __init__(self, settings: RuntimeSettings) -> None:
        if settings.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("classifier.device is 'cuda' but CUDA is not available")
        self.device = torch.device(settings.device)
        model, self.metadata = load_checkpoint(settings.path, map_location=self.device)
        # float16 only where it is fast and supported: CUDA. On CPU it is slower than float32.
        self.dtype = torch.float16 if settings.half and self.device.type == "cuda" else torch.float32
        # channels_last lets oneDNN/cuDNN pick their fast convolution kernels (about 1.5x on this
        # project's 2-core CPU, benchmarks/classifier_throughput.py).
        self.model = model.to(self.device, dtype=self.dtype, memory_format=torch.channels_last).eval()

    @torch.inference_mode()
    def logits(self, batch: np.ndarray) -> np.ndarray:
        # from_numpy shares the batch's memory, and on CPU in float32 .to() and .float() return the
        # same tensor: no copy is added on the CPU path.
        inputs = torch.from_numpy(batch).to(self.device, dtype=self.dtype, non_blocking=True).contiguous(memory_format=torch.channels_last)
        return self.model(inputs).float().cpu().numpy()
