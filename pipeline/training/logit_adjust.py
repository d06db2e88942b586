"""Post-hoc logit adjustment for class imbalance (``ferstream adjust-logits``).

A model trained on FER2013 sees disgust in 1.5% of the images and learns that prior: it rarely
predicts disgust even when the face shows it. Logit adjustment (Menon et al., "Long-tail learning
via logit adjustment", ICLR 2021) subtracts ``tau * log(prior)`` from the logits, with ``prior``
the training split's class frequencies: ``tau = 0`` is the trained model, ``tau = 1`` the
Bayes-optimal rule for balanced error. The adjustment is folded into the bias of the network's
final linear layer, so every runtime (PyTorch, the ONNX and TorchScript exports, the service)
applies it with no code of its own.

``tau`` is chosen on the validation split (the only split models are chosen on): the highest
top-1 accuracy among the candidates whose every per-class recall exceeds ``--min-recall``; if
none does, the candidate with the highest smallest recall. The sweep is stored in the
checkpoint's metrics, and the adjusted checkpoint gets ``-la<tau>`` appended to its model id.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from pipeline.training.data import DatasetError
from pipeline.training.evaluate import confusion_matrix, metrics_from_confusion, predict_probabilities
from pipeline.training.options import add_compute_arguments, apply_threads
from pipeline.training.splits import add_dataset_arguments, load_split_from_args

__all__ = ["adjusted_metrics", "choose_tau", "final_linear", "fold_adjustment", "log_priors", "main", "sweep"]

DEFAULT_TAUS = (0.0, 0.125, 0.25, 0.375, 0.5, 0.75, 1.0)


def log_priors(class_counts: Sequence[int] | np.ndarray) -> np.ndarray:
    counts = np.asarray(class_counts, dtype=np.float64)
    if (counts <= 0).any():
        raise ValueError(f"every class needs at least one training image for its prior, got counts {counts.tolist()}")
    return np.log(counts / counts.sum())


def adjusted_metrics(
    probabilities: np.ndarray, labels: np.ndarray, log_prior: np.ndarray, tau: float, classes: Sequence[str]
) -> dict[str, Any]:
    """``ferstream eval``'s metrics of the predictions argmax(log p - tau log prior)."""
    predictions = (np.log(np.clip(probabilities, 1e-12, None)) - tau * log_prior).argmax(1)
    return metrics_from_confusion(confusion_matrix(labels, predictions, len(classes)), classes)


def sweep(
    probabilities: np.ndarray, labels: np.ndarray, log_prior: np.ndarray, taus: Sequence[float], classes: Sequence[str]
) -> list[dict[str, Any]]:
    """Accuracy, macro-F1 and per-class recall for each ``tau``."""
    rows = []
    for tau in taus:
        metrics = adjusted_metrics(probabilities, labels, log_prior, tau, classes)
        recalls = {name: metrics["per_class"][name]["recall"] for name in classes}
        rows.append({"tau": float(tau), "accuracy": metrics["accuracy"], "macro_f1": metrics["macro"]["f1"], "recall": recalls})
    return rows


def choose_tau(rows: Sequence[dict[str, Any]], min_recall: float) -> dict[str, Any]:
    """The row with the best accuracy among those with every recall > ``min_recall`` (ties: the
    smaller tau); if none qualifies, the row with the highest smallest recall."""
    if not rows:
        raise ValueError("no candidate tau")
    qualified = [row for row in rows if min(row["recall"].values()) > min_recall]
    if qualified:
        return max(qualified, key=lambda row: (row["accuracy"], -row["tau"]))
    return max(rows, key=lambda row: (min(row["recall"].values()), -row["tau"]))


def final_linear(model: nn.Module, num_classes: int) -> nn.Linear:
    """The last ``nn.Linear`` producing the class logits (the layer the adjustment folds into)."""
    linears = [module for module in model.modules() if isinstance(module, nn.Linear) and module.out_features == num_classes]
    if not linears or linears[-1].bias is None:
        raise CheckpointError(f"the model has no final nn.Linear with a bias and {num_classes} outputs to fold the adjustment into")
    return linears[-1]


def fold_adjustment(model: nn.Module, log_prior: np.ndarray, tau: float) -> None:
    """Subtract ``tau * log_prior`` from the final layer's bias, in place."""
    layer = final_linear(model, len(log_prior))
    with torch.no_grad():
        layer.bias -= torch.as_tensor(tau * log_prior, dtype=layer.bias.dtype, device=layer.bias.device)


def _parse_taus(value: str) -> list[float]:
    taus = [float(part) for part in value.split(",") if part.strip()]
    if not taus or any(not math.isfinite(tau) or tau < 0 for tau in taus):
        raise argparse.ArgumentTypeError(f"--taus needs comma-separated numbers >= 0, got {value!r}")
    return taus


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ferstream adjust-logits",
        description="Fold a post-hoc logit adjustment for class imbalance into a checkpoint, tau chosen on val",
    )
    parser.add_argument("--model", required=True, help="checkpoint to adjust")
    parser.add_argument("--train-data", required=True, help="the training split the priors come from (e.g. .../fer2013/train)")
    parser.add_argument("--data", required=True, help="the validation split tau is chosen on (e.g. .../fer2013/val)")
    add_dataset_arguments(parser)
    parser.add_argument("--train-split", default=None, help="as --split, for --train-data (default: Training / train for CSV / RAF-DB)")
    parser.add_argument("--split", default=None, help="as in `ferstream eval` (default: PublicTest / test for CSV / RAF-DB)")
    parser.add_argument("--taus", type=_parse_taus, default=list(DEFAULT_TAUS), help="candidate taus, comma-separated")
    parser.add_argument("--min-recall", type=float, default=0.35, help="every class's val recall must exceed this")
    parser.add_argument("--output", required=True, help="where to write the adjusted checkpoint")
    add_compute_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    apply_threads(args)
    try:
        model, metadata = load_checkpoint(Path(args.model).expanduser())
        train = load_split_from_args(args, args.train_data, args.train_split, metadata.resize_to, metadata.classes, default_split=0).dataset
        val = load_split_from_args(args, args.data, args.split, metadata.resize_to, metadata.classes).dataset
        log_prior = log_priors(train.class_counts())
        final_linear(model, len(metadata.classes))  # fail before the sweep if there is nothing to fold into
    except (FileNotFoundError, CheckpointError, DatasetError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with torch.no_grad():
        probabilities = predict_probabilities(model, metadata, val.images)
    rows = sweep(probabilities, val.labels, log_prior, args.taus, metadata.classes)
    chosen = choose_tau(rows, args.min_recall)
    fold_adjustment(model, log_prior, chosen["tau"])
    adjustment = {
        "tau": chosen["tau"],
        "train_class_counts": train.class_counts().tolist(),
        "min_recall": args.min_recall,
        "chosen_on": str(Path(args.data).expanduser()),
        "sweep": rows,
    }
    final = adjusted_metrics(probabilities, val.labels, log_prior, chosen["tau"], metadata.classes)
    # The val numbers of the adjusted model replace the trained model's; the loss was not recomputed.
    metrics = {key: value for key, value in metadata.metrics.items() if key != "loss"}
    metrics.update(
        accuracy=final["accuracy"],
        macro_f1=final["macro"]["f1"],
        per_class_recall=chosen["recall"],
        confusion_matrix=final["confusion_matrix"],
        logit_adjustment=adjustment,
    )
    adjusted = dataclasses.replace(metadata, model_id=f"{metadata.model_id}-la{chosen['tau']:g}", metrics=metrics)
    output = Path(args.output).expanduser()
    save_checkpoint(output, model, adjusted)
    print(json.dumps({"output": str(output), "model_id": adjusted.model_id, "chosen": chosen, "sweep": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
