"""Classifier evaluation: confusion-matrix metrics (pure arithmetic) and ``ferstream eval``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.checkpoint import CheckpointError, ModelMetadata, default_checkpoint_path, load_checkpoint, preprocess_crops
from pipeline.training.data import DatasetError
from pipeline.training.options import add_compute_arguments, apply_threads
from pipeline.training.splits import add_dataset_arguments, load_split_from_args

__all__ = [
    "ECE_BINS",
    "confusion_matrix",
    "evaluate",
    "expected_calibration_error",
    "main",
    "metrics_from_confusion",
    "plot_confusion_matrix",
    "plot_reliability_diagram",
    "predict_probabilities",
    "reliability_bins",
]

# Equal-width confidence bins for ECE and the reliability diagram (Guo et al., "On calibration of modern neural networks", 2017).
ECE_BINS = 15


def confusion_matrix(labels: Sequence[int] | np.ndarray, predictions: Sequence[int] | np.ndarray, num_classes: int) -> np.ndarray:
    """Rows = true class, columns = predicted class."""
    labels = np.asarray(labels, dtype=np.int64)
    predictions = np.asarray(predictions, dtype=np.int64)
    if labels.shape != predictions.shape:
        raise ValueError(f"labels {labels.shape} and predictions {predictions.shape} differ in shape")
    return np.bincount(labels * num_classes + predictions, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _ratio(numerator: float, denominator: float) -> float:
    # A class never predicted (or absent) has an undefined precision/recall; report 0 like sklearn's zero_division=0.
    return float(numerator / denominator) if denominator > 0 else 0.0


def metrics_from_confusion(cm: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1/specificity/support, macro and support-weighted averages."""
    cm = np.asarray(cm, dtype=np.int64)
    if cm.shape != (len(classes), len(classes)):
        raise ValueError(f"confusion matrix {cm.shape} does not match {len(classes)} classes")
    total = int(cm.sum())
    per_class: dict[str, dict[str, float | int]] = {}
    for i, name in enumerate(classes):
        tp = int(cm[i, i])
        fn = int(cm[i].sum()) - tp
        fp = int(cm[:, i].sum()) - tp
        tn = total - tp - fn - fp
        precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
        per_class[name] = {
            "precision": precision,
            "recall": recall,
            "f1": _ratio(2 * precision * recall, precision + recall),
            "specificity": _ratio(tn, tn + fp),
            "support": tp + fn,
        }
    keys = ("precision", "recall", "f1", "specificity")
    supports = np.array([per_class[name]["support"] for name in classes], dtype=np.float64)
    macro = {k: float(np.mean([per_class[name][k] for name in classes])) for k in keys}
    weighted = {
        k: float(np.dot([per_class[name][k] for name in classes], supports) / supports.sum()) if supports.sum() > 0 else 0.0 for k in keys
    }
    return {
        "n": total,
        "classes": list(classes),
        "accuracy": _ratio(int(np.trace(cm)), total),
        "per_class": per_class,
        "macro": macro,
        "weighted": weighted,
        "confusion_matrix": cm.tolist(),
    }


# --------------------------------------------------------------------------- calibration


def reliability_bins(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> list[dict[str, float]]:
    """Per equal-width bin of top-1 confidence: its range, count, mean confidence and accuracy (empty bins included)."""
    confidence = probabilities.max(1)
    correct = probabilities.argmax(1) == labels
    # Right-closed bins (0, 1/B], ..., ((B-1)/B, 1]: a confidence of exactly 1 lands in the last one.
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    rows = []
    for b in range(bins):
        mask = index == b
        count = int(mask.sum())
        rows.append(
            {
                "low": b / bins,
                "high": (b + 1) / bins,
                "count": count,
                "confidence": float(confidence[mask].mean()) if count else 0.0,
                "accuracy": float(correct[mask].mean()) if count else 0.0,
            }
        )
    return rows


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """Sum over bins of (bin share of samples) x |accuracy - mean confidence| of the top-1 prediction."""
    total = len(labels)
    if total == 0:
        return 0.0
    return float(
        sum(row["count"] / total * abs(row["accuracy"] - row["confidence"]) for row in reliability_bins(probabilities, labels, bins))
    )


def _negative_log_likelihood(probabilities: np.ndarray, labels: np.ndarray) -> float:
    if len(labels) == 0:
        return 0.0
    return float(-np.log(np.clip(probabilities[np.arange(len(labels)), labels], 1e-12, None)).mean())


def plot_reliability_diagram(probabilities: np.ndarray, labels: np.ndarray, path: Path, title: str, bins: int = ECE_BINS) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = reliability_bins(probabilities, labels, bins)
    centres = [(row["low"] + row["high"]) / 2 for row in rows]
    width = 1.0 / bins
    fig, (ax, ax_count) = plt.subplots(2, 1, figsize=(6, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.bar(centres, [row["accuracy"] for row in rows], width=width * 0.95, color="tab:blue", label="accuracy")
    ax.bar(
        centres,
        [row["confidence"] - row["accuracy"] if row["count"] else 0.0 for row in rows],
        bottom=[row["accuracy"] for row in rows],
        width=width * 0.95,
        color="tab:red",
        alpha=0.35,
        label="gap to mean confidence",
    )
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ax.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1), title=f"{title}\nECE {expected_calibration_error(probabilities, labels, bins):.4f}")
    ax.legend(loc="upper left")
    ax_count.bar(centres, [row["count"] for row in rows], width=width * 0.95, color="gray")
    ax_count.set(xlabel="top-1 confidence", ylabel="faces")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- model evaluation


def _tta_views(model_inputs_full: torch.Tensor, input_size: int) -> list[torch.Tensor]:
    """Centre + 4 corner crops of the resized (uncropped) faces, each also mirrored: up to 10 views."""
    size = model_inputs_full.shape[-1]
    if size == input_size:
        offsets = [(0, 0)]
    else:
        c, e = (size - input_size) // 2, size - input_size
        offsets = [(c, c), (0, 0), (0, e), (e, 0), (e, e)]
    views = []
    for top, left in offsets:
        crop = model_inputs_full[:, :, top : top + input_size, left : left + input_size]
        views += [crop, crop.flip(-1)]
    return views


@torch.no_grad()
def predict_probabilities(
    model: nn.Module, metadata: ModelMetadata, images: Sequence[np.ndarray] | np.ndarray, tta: bool = False, batch_size: int = 256
) -> np.ndarray:
    """N x K softmax probabilities; with ``tta`` the mean over hflip x (centre + corner) crops."""
    model.eval()
    crops = list(images)
    if not tta:
        inputs = preprocess_crops(crops, metadata)
        chunks = [torch.softmax(model(inputs[i : i + batch_size]), 1) for i in range(0, inputs.shape[0], batch_size)]
        return torch.cat(chunks).numpy() if chunks else np.zeros((0, len(metadata.classes)), dtype=np.float32)
    # Same transform as preprocess_crops, minus the centre crop, so every view is a crop of identical pixels.
    full = preprocess_crops(crops, dataclasses.replace(metadata, input_size=metadata.resize_to))
    chunks = []
    for i in range(0, full.shape[0], batch_size):
        views = _tta_views(full[i : i + batch_size], metadata.input_size)
        probabilities = torch.stack([torch.softmax(model(view.contiguous()), 1) for view in views])
        chunks.append(probabilities.mean(0))
    return torch.cat(chunks).numpy() if chunks else np.zeros((0, len(metadata.classes)), dtype=np.float32)


def _metrics_from_probabilities(probabilities: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    predictions = probabilities.argmax(1)
    result = metrics_from_confusion(confusion_matrix(labels, predictions, len(classes)), classes)
    k = min(5, len(classes))
    top_k = np.argsort(-probabilities, axis=1)[:, :k]
    result["top5_accuracy"] = float((top_k == labels[:, None]).any(1).mean()) if len(labels) else 0.0
    result["nll"] = _negative_log_likelihood(probabilities, labels)
    result["ece"] = expected_calibration_error(probabilities, labels)
    result["ece_bins"] = ECE_BINS
    return result


def evaluate(
    model: nn.Module, metadata: ModelMetadata, images: Sequence[np.ndarray] | np.ndarray, labels: np.ndarray, tta: bool
) -> dict[str, Any]:
    """Metrics of ``model`` on uint8 face ``images`` with integer ``labels`` (indices into metadata.classes).

    The top level holds the plain (single centre crop) metrics; with ``tta`` the same keys computed
    with test-time augmentation are added under ``"tta"``, so the two are never confused.
    """
    return _evaluate_with_probabilities(model, metadata, images, labels, tta)[0]


def _evaluate_with_probabilities(
    model: nn.Module, metadata: ModelMetadata, images: Sequence[np.ndarray] | np.ndarray, labels: np.ndarray, tta: bool
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """:func:`evaluate`'s metrics, plus the plain probabilities and the labels (for the reliability diagram)."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(labels) != len(images):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    probabilities = predict_probabilities(model, metadata, images)
    result = _metrics_from_probabilities(probabilities, labels, metadata.classes)
    if tta:
        result["tta"] = _metrics_from_probabilities(predict_probabilities(model, metadata, images, tta=True), labels, metadata.classes)
    return result, probabilities, labels


def reliability_plot_path(confusion_png: Path) -> Path:
    """The reliability diagram goes next to the confusion matrix: ``x_confusion.png`` -> ``x_reliability.png``."""
    stem = confusion_png.stem.removesuffix("_confusion")
    return confusion_png.with_name(f"{stem}_reliability{confusion_png.suffix or '.png'}")


def default_plot_path(model_path: Path) -> Path:
    """Next to the model (its run folder), except for the shipped model: never write into the package."""
    name = f"{model_path.stem}_confusion.png"
    if model_path.resolve() == default_checkpoint_path().resolve():
        return Path("~/.cache/ferstream/eval").expanduser() / name
    return model_path.with_name(name)


def plot_confusion_matrix(cm: np.ndarray, classes: Sequence[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    # Colour by row-normalized recall (so rare classes like disgust are readable), annotate raw counts.
    rates = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(7, 6))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted", ylabel="true", title=title)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(
                j,
                i,
                f"{cm[i, j]}\n{rates[i, j]:.0%}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if rates[i, j] > 0.5 else "black",
            )
    fig.colorbar(image, ax=ax, fraction=0.046, label="row-normalized")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _print_human(result: dict[str, Any], label: str) -> None:
    print(
        f"{label}: n={result['n']} top-1={result['accuracy']:.4f} top-5={result['top5_accuracy']:.4f} macro-F1={result['macro']['f1']:.4f} "
        f"ECE={result['ece']:.4f} NLL={result['nll']:.4f}"
    )
    print(f"  {'class':<10} {'prec':>6} {'recall':>6} {'f1':>6} {'spec':>6} {'support':>7}")
    for name, row in result["per_class"].items():
        print(f"  {name:<10} {row['precision']:6.3f} {row['recall']:6.3f} {row['f1']:6.3f} {row['specificity']:6.3f} {row['support']:7d}")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ferstream eval", description="Evaluate an expression checkpoint on a labelled dataset split")
    parser.add_argument("--data", required=True, help="ImageFolder tree (e.g. .../fer2013/val), fer2013.csv or a RAF-DB root")
    add_dataset_arguments(parser)
    parser.add_argument(
        "--split",
        default=None,
        help="ImageFolder: a subfolder of --data (default: --data itself); fer2013.csv/FER+: a Usage (default PublicTest); "
        "RAF-DB: train or test (default test)",
    )
    parser.add_argument("--model", default=None, help="checkpoint (default: the shipped pipeline/assets/expression_default.pt)")
    parser.add_argument("--tta", action="store_true", help="also report metrics with hflip + 5-crop test-time augmentation")
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object")
    parser.add_argument(
        "--output",
        default=None,
        help="confusion-matrix PNG path; the reliability diagram goes next to it as <stem>_reliability.png "
        "(default: <model stem>_confusion.png next to --model; "
        "for the shipped model ~/.cache/ferstream/eval/expression_default_confusion.png)",
    )
    parser.add_argument("--no-plot", action="store_true", help="do not write the confusion-matrix and reliability PNGs")
    add_compute_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    apply_threads(args)
    model_path = Path(args.model).expanduser() if args.model else default_checkpoint_path()
    try:
        model, metadata = load_checkpoint(model_path)
        loaded = load_split_from_args(args, args.data, args.split, metadata.resize_to, metadata.classes)
    except (FileNotFoundError, CheckpointError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result: dict[str, Any] = {
        "model": str(model_path),
        "model_id": metadata.model_id,
        "data": str(Path(args.data).expanduser()),
        "data_format": loaded.data_format,
        "data_split": loaded.split,
    }
    metrics, probabilities, labels = _evaluate_with_probabilities(model, metadata, loaded.dataset.images, loaded.dataset.labels, args.tta)
    result.update(metrics)
    if not args.no_plot:
        plot_path = Path(args.output).expanduser() if args.output else default_plot_path(model_path)
        title = f"{metadata.model_id} on {Path(args.data).name}{f' {loaded.split}' if loaded.split else ''}: top-1 {result['accuracy']:.1%}"
        plot_confusion_matrix(np.array(result["confusion_matrix"]), metadata.classes, plot_path, title)
        result["confusion_matrix_png"] = str(plot_path)
        reliability_path = reliability_plot_path(plot_path)
        plot_reliability_diagram(probabilities, labels, reliability_path, f"{metadata.model_id} on {Path(args.data).name}: reliability")
        result["reliability_png"] = str(reliability_path)
    if args.json:
        print(json.dumps(result))
    else:
        _print_human(result, "plain")
        if args.tta:
            _print_human(result["tta"], "tta")
        if "confusion_matrix_png" in result:
            print(f"confusion matrix: {result['confusion_matrix_png']}")
            print(f"reliability diagram: {result['reliability_png']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
