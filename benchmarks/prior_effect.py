"""The class priors' effect on every class of FER2013 val (pipeline/priors.py), with the shipped model.

Usage:
    python benchmarks/prior_effect.py [--data /work/shared/datasets/fer2013/val] [--model M.pt] [--json OUT]

The model's val probabilities are computed once (plain centre crop, as the service does), then
re-weighted as ``CameraAnalyzer`` would: no prior; a uniform deployment prior (the same argmax as
``ferstream adjust-logits`` with tau 1); the README's neutral-heavy example prior; and the online
estimate with its default settings over the faces in a fixed random order (one "camera", one face a
frame), with FER2013's training counts as train_prior and with the model's mean val probability as
train_prior. Each on val as it is (FER2013's mix, close to training's: a prior for cameras is expected
to cost accuracy there) and on val resampled to the README example's neutral-heavy mix.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.checkpoint import default_checkpoint_path, load_checkpoint
from pipeline.config import OnlineLabelShiftConfig, PriorsConfig
from pipeline.priors import PriorSettings, estimate_prior
from pipeline.training.data import load_image_folder
from pipeline.training.evaluate import confusion_matrix, metrics_from_confusion, predict_probabilities

README_EXAMPLE = {"angry": 1, "disgust": 0.2, "fear": 1, "happy": 3, "neutral": 8, "sad": 1, "surprise": 1}


def online_in_order(settings: PriorSettings, probabilities: np.ndarray, seed: int) -> np.ndarray:
    """Each face through one camera's ``OnlineLabelShift``, one face a frame, in a fixed random order."""
    order = np.random.default_rng(seed).permutation(len(probabilities))
    adjuster = settings.new_adjuster()
    adjusted = np.empty_like(probabilities)
    for index in order:
        adjusted[index] = adjuster.adjust(probabilities[index : index + 1])[0]
    return adjusted


def summary(probabilities: np.ndarray, labels: np.ndarray, classes: tuple[str, ...]) -> dict[str, Any]:
    metrics = metrics_from_confusion(confusion_matrix(labels, probabilities.argmax(1), len(classes)), classes)
    return {
        "accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro"]["f1"],
        "recall": {name: metrics["per_class"][name]["recall"] for name in classes},
        "precision": {name: metrics["per_class"][name]["precision"] for name in classes},
        "predicted_share": {name: float((probabilities.argmax(1) == i).mean()) for i, name in enumerate(classes)},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="/work/shared/datasets/fer2013/val")
    parser.add_argument("--model", default=None, help="a .pt checkpoint; default: the shipped model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, metadata = load_checkpoint(Path(args.model).expanduser() if args.model else default_checkpoint_path())
    classes = tuple(metadata.classes)
    val = load_image_folder(args.data, metadata.resize_to, classes)
    with torch.no_grad():
        probabilities = predict_probabilities(model, metadata, val.images)

    # The model's mean probability on val (FER2013's mix): as the online estimate's train_prior, "no shift" is the
    # EM's fixed point even where the model's probabilities are not calibrated per class (label smoothing).
    mean_val = {name: float(share) for name, share in zip(classes, probabilities.mean(axis=0), strict=True)}
    settings = {
        "deployment_prior uniform": PriorsConfig(deployment_prior={name: 1.0 for name in classes}),
        "deployment_prior README example": PriorsConfig(deployment_prior=README_EXAMPLE),
        "online (defaults)": PriorsConfig(online=OnlineLabelShiftConfig()),
        "online (defaults), train_prior = mean val probability": PriorsConfig(online=OnlineLabelShiftConfig(), train_prior=mean_val),
    }
    resolved = {name: PriorSettings.from_config(config, classes) for name, config in settings.items()}

    # Val resampled (with replacement, seed 0) to the README example's mix: a camera where most faces are neutral.
    rng = np.random.default_rng(0)
    mix = np.array([README_EXAMPLE[name] for name in classes], dtype=np.float64)
    mix /= mix.sum()
    drawn_labels = rng.choice(len(classes), size=len(val.labels), p=mix)
    by_class = [np.flatnonzero(val.labels == index) for index in range(len(classes))]
    shifted = np.array([rng.choice(by_class[label]) for label in drawn_labels])

    result: dict[str, Any] = {"model_id": metadata.model_id, "data": args.data, "n": len(val.labels), "mean_val_probability": mean_val}
    # The EM over all of val at once (no window), from each train_prior: where the online estimate heads.
    online_config = OnlineLabelShiftConfig()
    result["em_on_all_of_val"] = {}
    for name in ("online (defaults)", "online (defaults), train_prior = mean val probability"):
        prior = resolved[name]
        assert prior is not None
        estimate, iterations = estimate_prior(
            probabilities, prior.train_prior, prior.train_prior, online_config.max_iterations, online_config.tolerance, online_config.floor
        )
        shares = dict(zip(classes, estimate.round(4).tolist(), strict=True))
        result["em_on_all_of_val"][name] = {"estimate": shares, "iterations": iterations}
        print(f"EM on all of val, {name}: {result['em_on_all_of_val'][name]}")
    for split_name, indices in (("val", np.arange(len(val.labels))), ("val resampled to the README example mix", shifted)):
        rows = {"no prior": probabilities[indices]}
        for name, prior in resolved.items():
            assert prior is not None
            if name.startswith("online"):
                rows[name] = online_in_order(prior, probabilities[indices], seed=0)
            else:
                rows[name] = prior.new_adjuster().adjust(probabilities[indices])
        result[split_name] = {name: summary(adjusted, val.labels[indices], classes) for name, adjusted in rows.items()}
        print(f"\n{metadata.model_id} on {split_name} (n = {len(indices)}): accuracy, then recall / precision per class")
        print("| setting | accuracy | " + " | ".join(classes) + " |")
        print("|---|---|" + "---|" * len(classes))
        for name, row in result[split_name].items():
            cells = " | ".join(f"{row['recall'][c]:.3f} / {row['precision'][c]:.3f}" for c in classes)
            print(f"| {name} | {row['accuracy']:.2%} | {cells} |")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
