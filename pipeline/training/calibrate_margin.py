"""Calibrate the face crop margin for a detector and a checkpoint (``ferstream calibrate-margin``).

The classifier is trained on the dataset's own framing (FER2013: the whole 48x48 image), while the
service feeds it :func:`pipeline.classification.crop_faces` crops of detector boxes enlarged by a
margin on each side: the detector's ``face_margin`` (``detector.face_margin``), else the checkpoint's.
Detectors frame faces differently (BlazeFace's boxes are tighter than MTCNN's), so the margin is a
detector setting. This command measures which margin makes the two match; put ``best_margin`` in the
``detector:`` section's ``face_margin``:

1. every image is padded (replicate border, ``--pad`` pixels per side) and upscaled ``--upscale``
   times (bilinear), so the detector sees a face that fills most of a small frame;
2. the service's detector (``pipeline.detection.build_detector``; default: the pipeline's default
   detector, or the ``detector:`` section of ``--config``) runs on those frames
   through :func:`pipeline.detection.detect_frames`; with several faces, the highest score counts;
3. on the images with a face, the classifier is scored on service crops of that frame for each
   ``--margins`` value, and on the
   whole original image (the dataset's framing) through :func:`pipeline.checkpoint.preprocess_crops`.

It also reports the median detected box side in original-image pixels (the longest box side, as
the crop uses) and the margin that would make a median box exactly the original image's side:
``(side / median - 1) / 2``. ``best_margin`` is the scored margin with the most correct
predictions (ties go to the smaller margin). Nothing is random: the same inputs give the same output.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from pipeline.checkpoint import CheckpointError, ModelMetadata, default_checkpoint_path, load_checkpoint
from pipeline.classification import crop_faces
from pipeline.config import AnyDetectorConfig, ConfigError, PipelineConfig, load_config
from pipeline.detection import FaceDetection, FaceDetector, build_detector, detect_frames
from pipeline.training.data import DatasetError
from pipeline.training.evaluate import predict_probabilities
from pipeline.training.options import add_compute_arguments, apply_threads, int_at_least
from pipeline.training.splits import LoadedSplit, add_dataset_arguments, load_split_from_args

__all__ = [
    "DEFAULT_MARGINS",
    "best_detection",
    "calibrate",
    "detection_frame",
    "evenly_spaced",
    "fitting_margin",
    "main",
    "parse_margins",
]

DEFAULT_MARGINS = (0.0, 0.05, 0.10, 0.15, 0.20, 0.30)
DEFAULT_UPSCALE = 3
DEFAULT_PAD = 8  # original-image pixels per side

# Crops (or whole images) -> predicted class indices.
Predictor = Callable[[list[np.ndarray]], np.ndarray]


def parse_margins(text: str) -> tuple[float, ...]:
    """``"0,0.05,0.1"`` -> sorted unique margins; each must be finite and above -0.5 (a crop of positive size)."""
    values = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            value = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not a number") from None
        if not math.isfinite(value) or value <= -0.5:
            raise argparse.ArgumentTypeError(f"margin {item} must be a finite number above -0.5")
        values.append(value)
    if not values:
        raise argparse.ArgumentTypeError("at least one margin is needed")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"margins repeat: {text}")
    return tuple(sorted(values))


def detection_frame(image: np.ndarray, pad: int, upscale: int) -> np.ndarray:
    """A grayscale uint8 image padded by ``pad`` pixels (replicate border), upscaled ``upscale`` times, as a BGR frame."""
    padded = cv2.copyMakeBorder(image, pad, pad, pad, pad, cv2.BORDER_REPLICATE)
    height, width = padded.shape[:2]
    large = cv2.resize(padded, (width * upscale, height * upscale), interpolation=cv2.INTER_LINEAR)
    return cv2.cvtColor(large, cv2.COLOR_GRAY2BGR)


def best_detection(detections: Sequence[FaceDetection]) -> FaceDetection | None:
    """The highest-scoring face (the first of equal scores), or None when there is none."""
    return max(detections, key=lambda detection: detection.score, default=None)


def box_side(detection: FaceDetection) -> float:
    """The longest box side, the one :func:`pipeline.classification.face_crop_transform` scales by."""
    x1, y1, x2, y2 = detection.box
    return float(max(x2 - x1, y2 - y1))


def fitting_margin(image_side: float, box_side_px: float) -> float:
    """The margin that enlarges a box of ``box_side_px`` to exactly ``image_side``."""
    return (image_side / box_side_px - 1.0) / 2.0


def evenly_spaced(n: int, limit: int | None) -> np.ndarray:
    """Indices of ``limit`` images spread evenly over ``n`` (all of them without a limit): every class of a sorted folder tree."""
    if limit is None or limit >= n:
        return np.arange(n)
    if limit == 1:
        return np.array([0])
    return np.round(np.linspace(0, n - 1, limit)).astype(np.int64)


def _accuracy(predictions: np.ndarray, labels: np.ndarray) -> tuple[int, float | None]:
    correct = int((np.asarray(predictions) == labels).sum())
    return correct, (correct / len(labels) if len(labels) else None)


def calibrate(
    images: np.ndarray | Sequence[np.ndarray],
    labels: np.ndarray | Sequence[int],
    detector: FaceDetector,
    predict: Predictor,
    metadata: ModelMetadata,
    margins: Sequence[float] = DEFAULT_MARGINS,
    upscale: int = DEFAULT_UPSCALE,
    pad: int = DEFAULT_PAD,
    detection_size: int = 640,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Detect faces on the padded, upscaled ``images`` and score ``predict`` on service crops per margin (see the module docstring).

    ``images`` are square grayscale uint8 in the dataset's framing, ``labels`` their class indices.
    ``detector`` is any :class:`~pipeline.detection.FaceDetector`; ``predict`` maps uint8 crops to class indices.
    """
    labels = np.asarray(labels, dtype=np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if upscale < 1 or pad < 0 or batch_size < 1:
        raise ValueError(f"need upscale >= 1, pad >= 0 and batch_size >= 1, got {upscale}, {pad}, {batch_size}")
    margins = tuple(sorted(float(m) for m in margins))
    detected: list[int] = []
    sides: list[float] = []
    crops: dict[float, list[np.ndarray]] = {margin: [] for margin in margins}
    for start in range(0, len(labels), batch_size):
        frames = [detection_frame(np.asarray(image), pad, upscale) for image in images[start : start + batch_size]]
        for offset, (frame, found) in enumerate(zip(frames, detect_frames(detector, frames, detection_size), strict=True)):
            face = best_detection(found)
            if face is None:
                continue
            detected.append(start + offset)
            sides.append(box_side(face) / upscale)
            for margin in margins:
                crops[margin].extend(crop_faces(frame, [face], metadata, margin))

    subset = labels[detected]
    per_margin: dict[str, dict[str, Any]] = {}
    best_margin, best_correct = None, -1
    for margin in margins:
        correct, accuracy = _accuracy(predict(crops[margin]) if detected else np.zeros(0, np.int64), subset)
        per_margin[str(margin)] = {"accuracy": accuracy, "correct": correct, "n": len(detected)}
        if detected and correct > best_correct:  # strictly greater: ties keep the smaller margin
            best_margin, best_correct = margin, correct
    originals = [np.asarray(images[i]) for i in detected]
    _, fer_accuracy = _accuracy(predict(originals) if detected else np.zeros(0, np.int64), subset)
    image_side = int(np.asarray(images[0]).shape[0]) if len(labels) else None
    median_side = float(statistics.median(sides)) if sides else None
    return {
        "n": int(len(labels)),
        "detected": len(detected),
        "detected_fraction": len(detected) / len(labels) if len(labels) else None,
        "per_margin": per_margin,
        "fer_framing_accuracy": fer_accuracy,
        "image_side_px": image_side,
        "median_box_side_px": median_side,
        "fer_fit_margin": fitting_margin(image_side, median_side) if median_side else None,
        "best_margin": best_margin,
    }


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ferstream calibrate-margin",
        description="Score a checkpoint on the service's detector crops of a labelled split for several face_margin values",
    )
    parser.add_argument("--data", required=True, help="ImageFolder tree (e.g. .../fer2013/val), fer2013.csv or a RAF-DB root")
    add_dataset_arguments(parser)
    parser.add_argument(
        "--split",
        default=None,
        help="ImageFolder: a subfolder of --data (default: --data itself); fer2013.csv/FER+: a Usage (default PublicTest); "
        "RAF-DB: train or test (default test)",
    )
    parser.add_argument("--model", default=None, help="checkpoint (default: the shipped pipeline/assets/expression_default.pt)")
    parser.add_argument(
        "--config",
        default=None,
        help="pipeline YAML whose detector: section to use (default: the service's default detector)",
    )
    parser.add_argument(
        "--margins",
        type=parse_margins,
        default=DEFAULT_MARGINS,
        help="comma-separated face_margin values to score, each above -0.5 (default 0,0.05,0.1,0.15,0.2,0.3)",
    )
    parser.add_argument("--upscale", type=int_at_least(1), default=DEFAULT_UPSCALE, help="integer upscale of the padded image (default 3)")
    parser.add_argument(
        "--pad",
        type=int_at_least(0),
        default=DEFAULT_PAD,
        help=f"replicate-border pixels per side before upscaling (default {DEFAULT_PAD})",
    )
    parser.add_argument("--limit", type=int_at_least(1), default=None, help="use this many images, evenly spaced over the split")
    parser.add_argument(
        "--batch-size", type=int_at_least(1), default=64, help="images per detector batch and classifier batch (default 64)"
    )
    parser.add_argument("--json", action="store_true", help="print exactly one JSON object")
    add_compute_arguments(parser)
    return parser


def _print_human(result: dict[str, Any]) -> None:
    def percent(value: float | None) -> str:
        return "-" if value is None else f"{value:.1%}"

    print(f"{result['model_id']}: {result['detected']} of {result['n']} images with a face ({result['detector']['kind']})")
    print(f"  {'margin':>7} {'top-1':>7}")
    for margin, row in result["per_margin"].items():
        mark = "  best" if result["best_margin"] is not None and float(margin) == result["best_margin"] else ""
        print(f"  {float(margin):7.2f} {percent(row['accuracy']):>7}{mark}")
    print(f"  dataset framing: {percent(result['fer_framing_accuracy'])}")
    if result["median_box_side_px"] is not None:
        print(
            f"  median box side {result['median_box_side_px']:.1f} px of {result['image_side_px']} px: "
            f"fitting margin {result['fer_fit_margin']:+.3f}"
        )


@dataclass(frozen=True)
class DetectorRun:
    """What a command that scores a checkpoint on the service's detector crops loads from its arguments
    (``--model``, ``--config``, ``--data``/``--split``): shared by ``calibrate-margin`` and ``eval-stream``."""

    model_path: Path
    model: torch.nn.Module
    metadata: ModelMetadata
    detector_config: AnyDetectorConfig
    detector: FaceDetector
    loaded: LoadedSplit

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DetectorRun:
        """Raises FileNotFoundError, CheckpointError, DatasetError or ConfigError naming what is wrong."""
        model_path = Path(args.model).expanduser() if args.model else default_checkpoint_path()
        detector_config = load_config(args.config).detector if args.config else PipelineConfig().detector
        model, metadata = load_checkpoint(model_path)
        loaded = load_split_from_args(args, args.data, args.split, metadata.resize_to, metadata.classes)
        return cls(model_path, model, metadata, detector_config, build_detector(detector_config), loaded)

    def description(self, args: argparse.Namespace) -> dict[str, Any]:
        """The model, data and detector the figures are about, for the JSON result."""
        config = self.detector_config
        return {
            "model": str(self.model_path),
            "model_id": self.metadata.model_id,
            "checkpoint_face_margin": self.metadata.face_margin,
            "data": str(Path(args.data).expanduser()),
            "data_format": self.loaded.data_format,
            "data_split": self.loaded.split,
            "limit": args.limit,
            "detector": {
                "kind": config.kind,
                "min_face_size": config.min_face_size,
                "score_threshold": config.score_threshold,
                "detection_size": config.detection_size,
                "face_margin": config.face_margin,
            },
        }


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    apply_threads(args)
    try:
        run = DetectorRun.from_args(args)
    except (FileNotFoundError, CheckpointError, DatasetError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model, metadata, detector, detector_config = run.model, run.metadata, run.detector, run.detector_config
    dataset = run.loaded.dataset
    indices = evenly_spaced(len(dataset), args.limit)

    def predict(crops: list[np.ndarray]) -> np.ndarray:
        return predict_probabilities(model, metadata, crops, batch_size=args.batch_size).argmax(1)

    result: dict[str, Any] = {
        **run.description(args),
        "margins": list(args.margins),
        "pad": args.pad,
        "upscale": args.upscale,
        "interpolation": "bilinear",
    }
    result.update(
        calibrate(
            dataset.images[indices],
            dataset.labels[indices],
            detector,
            predict,
            metadata,
            margins=args.margins,
            upscale=args.upscale,
            pad=args.pad,
            detection_size=detector_config.detection_size,
            batch_size=args.batch_size,
        )
    )
    if args.json:
        print(json.dumps(result))
    else:
        _print_human(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
