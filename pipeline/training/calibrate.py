"""Temperature scaling (``ferstream calibrate``): make a model's confidence mean what it says.

Guo et al., "On calibration of modern neural networks" (ICML 2017): one scalar ``T > 0`` divides
the logits, fitted by LBFGS on the validation NLL. ``T`` changes no prediction (the argmax is the
same), only how confident each one is, so an event's ``confidence`` of 0.8 is right about 80% of
the time. It is folded into the model file:

* an ensemble (:class:`pipeline.architectures.ProbabilityEnsemble`) has a ``temperature`` buffer,
  which is multiplied by ``T``;
* any other network gets ``1/T`` folded into the weight and bias of its final linear layer
  (``logits / T`` exactly), so the checkpoint keeps its architecture and every runtime (PyTorch,
  the ONNX and TorchScript exports, the service) applies it with no code of its own.

``T`` is fitted on val, the split the calibrated checkpoint's recorded metrics are measured on.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.checkpoint import CheckpointError, load_checkpoint, preprocess_crops, save_checkpoint
from pipeline.training.data import DatasetError
from pipeline.training.evaluate import evaluate
from pipeline.training.logit_adjust import final_linear
from pipeline.training.options import add_compute_arguments, apply_threads
from pipeline.training.splits import add_dataset_arguments, load_split_from_args

__all__ = ["fit_temperature", "fold_temperature", "main"]


def fit_temperature(logits: Tensor, labels: Tensor, max_iter: int = 200) -> float:
    """The ``T`` minimizing ``cross_entropy(logits / T, labels)``; optimized as ``log T`` so it stays positive."""
    logits, labels = logits.detach().double(), labels.long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp())


def fold_temperature(model: nn.Module, temperature: float, num_classes: int) -> None:
    """Make ``model(x)`` return ``model(x) / temperature`` from now on, in place."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    buffer = getattr(model, "temperature", None)
    with torch.no_grad():
        if isinstance(buffer, Tensor):
            buffer.mul_(temperature)
            return
        layer = final_linear(model, num_classes)
        layer.weight.div_(temperature)
        layer.bias.div_(temperature)


@torch.no_grad()
def _logits(model: nn.Module, inputs: Tensor, batch_size: int = 512) -> Tensor:
    model.eval()
    chunks = [model(inputs[i : i + batch_size]).float() for i in range(0, inputs.shape[0], batch_size)]
    return torch.cat(chunks)


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    return {key: result[key] for key in ("accuracy", "nll", "ece")} | {"macro_f1": result["macro"]["f1"]}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ferstream calibrate", description="Fit a softmax temperature on a labelled val split and fold it into the model file"
    )
    parser.add_argument("model", help="checkpoint to calibrate (any ferstream model file, ensembles included)")
    parser.add_argument("--data", required=True, help="labelled validation split to fit the temperature on")
    add_dataset_arguments(parser)
    parser.add_argument("--split", default=None, help="as for `ferstream eval`")
    parser.add_argument("--output", default=None, help="calibrated checkpoint (default: <model stem>-cal.pt next to the model)")
    add_compute_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    apply_threads(args)
    model_path = Path(args.model).expanduser()
    try:
        model, metadata = load_checkpoint(model_path)
        loaded = load_split_from_args(args, args.data, args.split, metadata.resize_to, metadata.classes)
    except (FileNotFoundError, CheckpointError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    images, labels = loaded.dataset.images, np.asarray(loaded.dataset.labels, dtype=np.int64)
    before = evaluate(model, metadata, images, labels, tta=False)
    temperature = fit_temperature(_logits(model, preprocess_crops(list(images), metadata)), torch.from_numpy(labels))
    try:
        fold_temperature(model, temperature, len(metadata.classes))
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    after = evaluate(model, metadata, images, labels, tta=False)
    calibration = {
        "method": "temperature scaling (LBFGS on val NLL)",
        "temperature": temperature,
        "fitted_on": f"{Path(args.data).expanduser()}{f' {loaded.split}' if loaded.split else ''}",
        "before": _summary(before),
        "after": _summary(after),
    }
    metrics = {
        **metadata.metrics,
        "calibration": calibration,
        "loss": after["nll"],
        "ece": after["ece"],
        "accuracy": after["accuracy"],
        "macro_f1": after["macro"]["f1"],
    }
    calibrated = dataclasses.replace(metadata, model_id=f"{metadata.model_id}-t{temperature:.2f}", metrics=metrics)
    output = Path(args.output).expanduser() if args.output else model_path.with_name(f"{model_path.stem}-cal.pt")
    save_checkpoint(output, model, calibrated)
    print(json.dumps({"output": str(output), "model_id": calibrated.model_id, **calibration}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
