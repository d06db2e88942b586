"""Weighted ensembles of expression checkpoints (``ferstream ensemble``).

Every member's validation probabilities are computed once; the weights then come either from the
user (``--weights``) or from greedy ensemble selection with replacement (Caruana et al., "Ensemble
selection from libraries of models", ICML 2004, as AutoGluon uses it): start from nothing, and in
each round add the member (again, if it helps) whose addition gives the best val score of the
averaged probabilities. The integer counts, divided by the number of rounds, are the weights.

The result is ONE checkpoint of architecture ``ensemble`` (:class:`pipeline.architectures.ProbabilityEnsemble`):
``ferstream eval``, ``ferstream export`` (one ONNX graph) and the service load it like any other model.
The weights are chosen on val, the split the recorded metrics are measured on: the card says so.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.architectures import ProbabilityEnsemble, count_parameters
from pipeline.checkpoint import CheckpointError, ModelMetadata, load_checkpoint, save_checkpoint
from pipeline.training.data import DatasetError
from pipeline.training.evaluate import confusion_matrix, metrics_from_confusion, predict_probabilities
from pipeline.training.options import add_compute_arguments, apply_threads
from pipeline.training.splits import add_dataset_arguments, load_split_from_args

__all__ = ["SCORES", "build_ensemble", "greedy_selection", "main", "mixed_probabilities", "negative_log_likelihood"]


def negative_log_likelihood(probabilities: np.ndarray, labels: np.ndarray) -> float:
    picked = probabilities[np.arange(len(labels)), labels]
    return float(-np.log(np.clip(picked, 1e-12, None)).mean())


def _accuracy(probabilities: np.ndarray, labels: np.ndarray) -> float:
    return float((probabilities.argmax(1) == labels).mean())


# name -> (score function, higher_is_better). Selection ties break on NLL, then on the member order.
SCORES = {"nll": (negative_log_likelihood, False), "accuracy": (_accuracy, True)}


def mixed_probabilities(member_probabilities: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    weights_array = np.asarray(weights, dtype=np.float64)
    stacked = np.stack([np.asarray(p, dtype=np.float64) for p in member_probabilities])
    return np.tensordot(weights_array / weights_array.sum(), stacked, axes=1)


def greedy_selection(member_probabilities: Sequence[np.ndarray], labels: np.ndarray, rounds: int = 25, metric: str = "nll") -> list[int]:
    """Integer counts per member after ``rounds`` of greedy selection with replacement."""
    if not member_probabilities:
        raise ValueError("no members to select from")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    score_fn, higher_is_better = SCORES[metric]
    labels = np.asarray(labels, dtype=np.int64)
    members = [np.asarray(p, dtype=np.float64) for p in member_probabilities]
    counts = [0] * len(members)
    running = np.zeros_like(members[0])
    for step in range(rounds):
        best: tuple[float, float, int] | None = None
        for index, probabilities in enumerate(members):
            candidate = (running * step + probabilities) / (step + 1)
            score = score_fn(candidate, labels)
            key = (-score if higher_is_better else score, negative_log_likelihood(candidate, labels), index)
            if best is None or key < best:
                best = key
        assert best is not None
        chosen = best[2]
        counts[chosen] += 1
        running = (running * step + members[chosen]) / (step + 1)
    return counts


def _check_compatible(paths: Sequence[Path], metadatas: Sequence[ModelMetadata]) -> None:
    first = metadatas[0]
    for path, metadata in zip(paths[1:], metadatas[1:], strict=True):
        for key in ("classes", "input_size", "resize_to", "grayscale", "face_margin"):
            if getattr(metadata, key) != getattr(first, key):
                raise CheckpointError(
                    f"{path}: {key} {getattr(metadata, key)!r} differs from {paths[0]}'s {getattr(first, key)!r}; "
                    "ensemble members must see the same face crops"
                )


def build_ensemble(
    paths: Sequence[str | Path], weights: Sequence[float], model_id: str, metrics: dict[str, Any] | None = None
) -> tuple[ProbabilityEnsemble, ModelMetadata]:
    """One :class:`ProbabilityEnsemble` holding copies of the members' weights, and its metadata."""
    paths = [Path(p) for p in paths]
    loaded = [load_checkpoint(path) for path in paths]
    metadatas = [metadata for _, metadata in loaded]
    _check_compatible(paths, metadatas)
    # Members with weight 0 are left out of the file: they would only cost inference time.
    kept = [(path, model, metadata, float(w)) for (path, (model, metadata), w) in zip(paths, loaded, weights, strict=True) if w > 0]
    if not kept:
        raise ValueError(f"every weight is 0: {list(weights)}")
    first = kept[0][2]
    specs = [
        {"arch": metadata.arch, "arch_kwargs": dict(metadata.arch_kwargs), "mean": list(metadata.mean), "std": list(metadata.std)}
        for _, _, metadata, _ in kept
    ]
    total = sum(w for *_, w in kept)
    arch_kwargs: dict[str, Any] = {
        "members": specs,
        "weights": [w / total for *_, w in kept],
        "mean": list(first.mean),
        "std": list(first.std),
    }
    ensemble = ProbabilityEnsemble(len(first.classes), in_channels=first.channels, **arch_kwargs)
    for target, (_, model, _, _) in zip(ensemble.members, kept, strict=True):
        target.load_state_dict(model.state_dict())
    ensemble.eval()
    member_ids = [{"model_id": metadata.model_id, "path": str(path), "weight": w / total} for path, _, metadata, w in kept]
    metadata = ModelMetadata(
        model_id=model_id,
        arch="ensemble",
        arch_kwargs=arch_kwargs,
        classes=first.classes,
        input_size=first.input_size,
        resize_to=first.resize_to,
        grayscale=first.grayscale,
        mean=first.mean,
        std=first.std,
        face_margin=first.face_margin,
        metrics={"ensemble_members": member_ids, "params": count_parameters(ensemble), **(metrics or {})},
    )
    return ensemble, metadata


def _parse_weights(value: str) -> list[float]:
    try:
        weights = [float(part) for part in value.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--weights needs comma-separated numbers, got {value!r}") from None
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise argparse.ArgumentTypeError(f"--weights must be >= 0 with a positive sum, got {value!r}")
    return weights


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ferstream ensemble",
        description="Combine checkpoints into one ensemble checkpoint; weights by greedy selection on val or given by hand",
    )
    parser.add_argument("models", nargs="+", help="member checkpoints (any ferstream model files, ensembles included)")
    parser.add_argument("--data", required=True, help="labelled validation split the selection and the recorded metrics use")
    add_dataset_arguments(parser)
    parser.add_argument("--split", default=None, help="as for `ferstream eval`")
    parser.add_argument("--output", required=True, help="ensemble checkpoint to write")
    parser.add_argument("--model-id", default=None, help="model id recorded in the file (default: the output's stem)")
    parser.add_argument("--weights", type=_parse_weights, default=None, help="comma-separated weights, one per model (skips selection)")
    parser.add_argument("--metric", default="nll", choices=sorted(SCORES), help="what greedy selection optimizes on val")
    parser.add_argument("--rounds", type=int, default=25, help="greedy selection rounds (the weights are counts / rounds)")
    parser.add_argument(
        "--tta", action="store_true", help="select on hflip + 5-crop TTA probabilities (the service scores single centre crops)"
    )
    add_compute_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.weights is not None and len(args.weights) != len(args.models):
        print(f"error: --weights has {len(args.weights)} values for {len(args.models)} models", file=sys.stderr)
        return 2
    if args.rounds < 1:
        print(f"error: --rounds must be >= 1, got {args.rounds}", file=sys.stderr)
        return 2
    apply_threads(args)
    started = time.perf_counter()
    paths = [Path(p).expanduser() for p in args.models]
    try:
        members = [load_checkpoint(path) for path in paths]
        _check_compatible(paths, [metadata for _, metadata in members])
        first = members[0][1]
        loaded = load_split_from_args(args, args.data, args.split, first.resize_to, first.classes)
    except (FileNotFoundError, CheckpointError, DatasetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    labels = np.asarray(loaded.dataset.labels, dtype=np.int64)
    # Computed once per member; selection then only mixes arrays.
    probabilities = [predict_probabilities(model, metadata, loaded.dataset.images, tta=args.tta) for model, metadata in members]
    member_report = []
    for path, (_, metadata), p in zip(paths, members, probabilities, strict=True):
        member_report.append({"model": str(path), "model_id": metadata.model_id, "accuracy": _accuracy(p, labels)})
        member_report[-1]["nll"] = negative_log_likelihood(p, labels)
    if args.weights is not None:
        weights, selection = list(args.weights), {"method": "given"}
    else:
        counts = greedy_selection(probabilities, labels, rounds=args.rounds, metric=args.metric)
        weights = [c / args.rounds for c in counts]
        selection = {"method": "greedy selection with replacement", "metric": f"val {args.metric}", "rounds": args.rounds, "counts": counts}
    mixed = mixed_probabilities(probabilities, weights)
    val = metrics_from_confusion(confusion_matrix(labels, mixed.argmax(1), len(first.classes)), first.classes)
    metrics = {
        "selected_by": f"ensemble weights chosen on {loaded.split or Path(args.data).name} ({selection['method']})",
        "selection": {**selection, "tta": args.tta},
        "split": "val",
        "data": str(Path(args.data).expanduser()),
        "data_format": loaded.data_format,
        "data_split": loaded.split,
        "accuracy": val["accuracy"],
        "macro_f1": val["macro"]["f1"],
        "loss": negative_log_likelihood(mixed, labels),
        "n": val["n"],
        "per_class_recall": {c: val["per_class"][c]["recall"] for c in first.classes},
        "confusion_matrix": val["confusion_matrix"],
        "measured_with_tta": args.tta,
    }
    output = Path(args.output).expanduser()
    try:
        model, metadata = build_ensemble(paths, weights, args.model_id or output.stem, metrics)
    except (CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    save_checkpoint(output, model, metadata)
    report = {
        "output": str(output),
        "model_id": metadata.model_id,
        "members": member_report,
        "weights": weights,
        "selection": metrics["selection"],
        "accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro_f1"],
        "nll": metrics["loss"],
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
