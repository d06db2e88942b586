"""The stream-domain evaluation (``ferstream eval-stream``): FER2013 faces through H.264 and the service's own path.

Clean val scores a model on tight 48x48 crops; a camera gives it detector crops of small, compressed faces.
This command measures that gap on labelled faces (issue 14, "Synthetic"):

1. ``--limit`` images, evenly spaced over the split (deterministic), are upscaled (bilinear) to each face height of
   ``--sizes`` and pasted on a grid into ``--width`` x ``--height`` frames over a textured gray background;
2. each frame is shown for ``--hold`` frames and encoded with PyAV's libx264 at each ``--bitrates`` value
   (kbit/s, fixed GOP of ``--gop`` frames, no B-frames), then decoded back with PyAV;
3. on the last decoded frame of each hold, the service's detector (``--config``'s ``detector:`` section, default
   :class:`~pipeline.config.PipelineConfig`'s) runs through :func:`~pipeline.detection.detect_frames`; each pasted face
   is matched to the unused detection of highest IoU whose centre lies inside its box (none: a miss);
4. found faces are cropped with :func:`~pipeline.classification.crop_faces` at
   :func:`~pipeline.classification.crop_margin` and classified by the checkpoint.

Reported per (size, bitrate), per size, per bitrate and for the issue's target region (faces >= 48 px at >= 500
kbit/s): detection rate, accuracy on found faces, per-class recall and ``sad`` precision; and the clean accuracy of
the same images through :func:`~pipeline.checkpoint.preprocess_crops` for reference (over all of them, and over
just the faces found in each condition, since the detector does not miss faces at random). Nothing is random: the same
inputs give the same output (libx264 runs with one thread so its rate control does not depend on the machine).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import cv2
import numpy as np

from pipeline.checkpoint import CheckpointError, ModelMetadata
from pipeline.classification import crop_faces, crop_margin
from pipeline.config import ConfigError
from pipeline.detection import FaceDetection, FaceDetector, detect_frames
from pipeline.training.calibrate_margin import DetectorRun, evenly_spaced
from pipeline.training.data import DatasetError
from pipeline.training.evaluate import predict_probabilities
from pipeline.training.options import add_compute_arguments, apply_threads, int_at_least
from pipeline.training.splits import add_dataset_arguments

__all__ = [
    "DEFAULT_BITRATES",
    "DEFAULT_SIZES",
    "FaceLayout",
    "box_iou",
    "encode_decode",
    "evaluate_stream",
    "grid_layout",
    "main",
    "match_faces",
    "render_frame",
    "score",
]

DEFAULT_SIZES = (24, 32, 48, 64, 96, 128, 200)
DEFAULT_BITRATES = (250, 500, 1000, 2000)
TARGET_MIN_SIZE = 48  # the target region: faces at least this high ...
TARGET_MIN_KBPS = 500  # ... at least this bitrate
FPS = 30

Box = tuple[float, float, float, float]
# Face crops -> N x K probabilities.
Predictor = Callable[[list[np.ndarray]], np.ndarray]


@dataclass(frozen=True)
class FaceLayout:
    """Where the faces of one face size go in a frame: ``boxes`` (x1, y1, x2, y2) in paste order."""

    size: int
    boxes: tuple[tuple[int, int, int, int], ...]


def grid_layout(size: int, width: int, height: int) -> FaceLayout:
    """Faces of ``size`` px on a grid, a gap of half a face between them (so boxes never touch), centred in the frame.

    At least one face per frame; a face larger than the frame is an error."""
    if size > min(width, height):
        raise ValueError(f"a {size} px face does not fit a {width}x{height} frame")
    cell = size + max(size // 2, 8)
    columns, rows = max(1, width // cell), max(1, height // cell)
    x0, y0 = (width - columns * cell + cell - size) // 2, (height - rows * cell + cell - size) // 2
    x0, y0 = max(0, min(x0, width - size)), max(0, min(y0, height - size))
    boxes = tuple((x0 + c * cell, y0 + r * cell, x0 + c * cell + size, y0 + r * cell + size) for r in range(rows) for c in range(columns))
    return FaceLayout(size, boxes)


def background(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A neutral gray BGR background with low-contrast, smooth texture (a plain wall, not a flat field the encoder gets free)."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(0.0, 1.0, size=(height // 8 + 1, width // 8 + 1)).astype(np.float32)
    smooth = cv2.resize(noise, (width, height), interpolation=cv2.INTER_CUBIC)[:height, :width]
    gray = np.clip(128.0 + 12.0 * smooth, 0, 255).astype(np.uint8)
    return cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)


def render_frame(base: np.ndarray, faces: Sequence[np.ndarray], layout: FaceLayout) -> np.ndarray:
    """``base`` with each grayscale face upscaled (bilinear) into the next box of ``layout``."""
    frame = base.copy()
    for face, (x1, y1, x2, y2) in zip(faces, layout.boxes, strict=False):
        scaled = cv2.resize(np.asarray(face), (x2 - x1, y2 - y1), interpolation=cv2.INTER_LINEAR)
        frame[y1:y2, x1:x2] = scaled[:, :, None]
    return frame


def encode_decode(frames: Sequence[np.ndarray], kbps: int, gop: int, hold: int) -> list[np.ndarray]:
    """Encode ``frames`` (each shown ``hold`` times) as H.264 in MP4 at ``kbps`` with PyAV; decode it back.

    Returns the last decoded frame of each hold, one per input frame."""
    if not frames:
        return []
    height, width = frames[0].shape[:2]
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.bit_rate = kbps * 1000
        stream.gop_size = gop
        stream.max_b_frames = 0
        # One thread: x264's rate control is then the same on every machine; no scene cuts: the GOP stays fixed.
        stream.options = {"threads": "1", "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0"}
        for frame in frames:
            video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="bgr24")
            for _ in range(hold):
                container.mux(stream.encode(video_frame))
        container.mux(stream.encode(None))
    buffer.seek(0)
    with av.open(buffer, mode="r") as container:
        decoded = [frame.to_ndarray(format="bgr24") for frame in container.decode(video=0)]
    if len(decoded) != len(frames) * hold:
        raise RuntimeError(f"decoded {len(decoded)} frames, encoded {len(frames) * hold}")
    return decoded[hold - 1 :: hold]


def box_iou(a: Box, b: Box) -> float:
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match_faces(pasted: Sequence[Box], detections: Sequence[FaceDetection]) -> list[FaceDetection | None]:
    """For each pasted box, the unused detection of highest IoU whose centre lies inside the box, else None.

    Pairs are taken greedily by IoU over the whole frame, so one detection never counts for two faces."""
    pairs = []
    for i, box in enumerate(pasted):
        for j, detection in enumerate(detections):
            x1, y1, x2, y2 = detection.box
            cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
            if box[0] <= cx <= box[2] and box[1] <= cy <= box[3]:
                pairs.append((box_iou(tuple(map(float, box)), tuple(map(float, detection.box))), i, j))
    matched: list[FaceDetection | None] = [None] * len(pasted)
    used: set[int] = set()
    for _, i, j in sorted(pairs, key=lambda pair: (-pair[0], pair[1], pair[2])):
        if matched[i] is None and j not in used:
            matched[i] = detections[j]
            used.add(j)
    return matched


def score(labels: np.ndarray, found: np.ndarray, predictions: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Detection rate over all faces; accuracy, per-class recall and sad precision over the found ones.

    ``found`` is a boolean mask over ``labels``; ``predictions`` are class indices of the found faces (in order)."""
    labels, found, predictions = np.asarray(labels), np.asarray(found, dtype=bool), np.asarray(predictions, dtype=np.int64)
    truth = labels[found]
    n, n_found = len(labels), int(found.sum())
    correct = int((predictions == truth).sum())
    recall = {}
    for k, name in enumerate(classes):
        support = int((truth == k).sum())
        recall[name] = int(((predictions == k) & (truth == k)).sum()) / support if support else None
    result: dict[str, Any] = {
        "n": n,
        "found": n_found,
        "detection_rate": n_found / n if n else None,
        "accuracy": correct / n_found if n_found else None,
        "recall": recall,
    }
    if "sad" in classes:
        sad = list(classes).index("sad")
        called_sad = int((predictions == sad).sum())
        result["sad_precision"] = int(((predictions == sad) & (truth == sad)).sum()) / called_sad if called_sad else None
        result["called_sad"] = called_sad
    return result


def evaluate_stream(
    images: np.ndarray,
    labels: np.ndarray,
    detector: FaceDetector,
    predict: Predictor,
    metadata: ModelMetadata,
    margin: float,
    sizes: Sequence[int] = DEFAULT_SIZES,
    bitrates: Sequence[int] = DEFAULT_BITRATES,
    width: int = 640,
    height: int = 360,
    gop: int = 30,
    hold: int = 2,
    detection_size: int = 640,
) -> dict[str, Any]:
    """Run every image at every face size and bitrate through encode, decode, detect, crop and classify (module docstring)."""
    labels = np.asarray(labels, dtype=np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    classes = metadata.classes
    base = background(width, height)
    # (size, kbps) -> found mask and predictions of the found faces, in image order.
    outcomes: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    for size in sizes:
        layout = grid_layout(size, width, height)
        per_frame = len(layout.boxes)
        groups = [range(start, min(start + per_frame, len(labels))) for start in range(0, len(labels), per_frame)]
        frames = [render_frame(base, [images[i] for i in group], layout) for group in groups]
        for kbps in bitrates:
            decoded = encode_decode(frames, kbps, gop, hold)
            found = np.zeros(len(labels), dtype=bool)
            crops: list[np.ndarray] = []
            for group, frame, detections in zip(groups, decoded, detect_frames(detector, decoded, detection_size), strict=True):
                matched = match_faces([tuple(map(float, box)) for box in layout.boxes[: len(group)]], detections)
                for index, detection in zip(group, matched, strict=True):
                    if detection is not None:
                        found[index] = True
                        crops.extend(crop_faces(frame, [detection], metadata, margin))
            predictions = predict(crops).argmax(1) if crops else np.zeros(0, np.int64)
            outcomes[(size, kbps)] = (found, predictions)

    clean_predictions = predict(list(images)).argmax(1) if len(labels) else np.zeros(0, np.int64)
    clean = score(labels, np.ones(len(labels), bool), clean_predictions, classes)

    def pooled(keys: Sequence[tuple[int, int]]) -> dict[str, Any]:
        all_labels = np.concatenate([labels for _ in keys]) if keys else labels[:0]
        found = np.concatenate([outcomes[key][0] for key in keys]) if keys else np.zeros(0, bool)
        predictions = np.concatenate([outcomes[key][1] for key in keys]) if keys else np.zeros(0, np.int64)
        result = score(all_labels, found, predictions, classes)
        # The detector keeps some faces and not others, so compare with the clean accuracy of the very faces it found.
        clean_of_found = np.concatenate([clean_predictions for _ in keys])[found] if keys else clean_predictions[:0]
        result["clean_accuracy_of_found"] = float((clean_of_found == all_labels[found]).mean()) if found.any() else None
        return result

    target_keys = [(s, b) for s in sizes for b in bitrates if s >= TARGET_MIN_SIZE and b >= TARGET_MIN_KBPS]
    target = pooled(target_keys)
    if target["accuracy"] is not None:
        target["accuracy_gap_to_clean"] = clean["accuracy"] - target["accuracy"]
        target["accuracy_gap_to_clean_of_found"] = target["clean_accuracy_of_found"] - target["accuracy"]
    return {
        "n": int(len(labels)),
        "sizes": list(sizes),
        "bitrates_kbps": list(bitrates),
        "frame": {"width": width, "height": height, "fps": FPS, "gop": gop, "hold": hold, "codec": "libx264", "interpolation": "bilinear"},
        "faces_per_frame": {str(size): len(grid_layout(size, width, height).boxes) for size in sizes},
        "margin": margin,
        "clean": clean,
        "per_condition": {
            f"{size}px@{kbps}": {"size": size, "kbps": kbps, **pooled([(size, kbps)])} for size in sizes for kbps in bitrates
        },
        "per_size": {str(size): pooled([(size, kbps) for kbps in bitrates]) for size in sizes},
        "per_bitrate": {str(kbps): pooled([(size, kbps) for size in sizes]) for kbps in bitrates},
        "target": {"min_size": TARGET_MIN_SIZE, "min_kbps": TARGET_MIN_KBPS, **target},
    }


def write_plot(result: dict[str, Any], path: Path) -> None:
    """Accuracy on found faces vs face height, one line per bitrate, the clean accuracy as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for kbps in result["bitrates_kbps"]:
        points = [(size, result["per_condition"][f"{size}px@{kbps}"]["accuracy"]) for size in result["sizes"]]
        xs = [size for size, accuracy in points if accuracy is not None]
        axis.plot(xs, [accuracy for _, accuracy in points if accuracy is not None], marker="o", label=f"{kbps} kbit/s")
    axis.axhline(result["clean"]["accuracy"], color="black", linestyle="--", label="clean val (same faces)")
    axis.set_xscale("log")
    axis.minorticks_off()  # the log axis's minor labels would overprint the face heights
    axis.set_xticks(result["sizes"], [str(size) for size in result["sizes"]])
    axis.set_xlabel("face height (px)")
    axis.set_ylabel("accuracy on detected faces")
    axis.set_title(f"{result.get('model_id', '')} via H.264 and {result.get('detector', {}).get('kind', 'detector')}")
    axis.legend()
    axis.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(sorted({int(item) for item in text.split(",") if item.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: need at least one value, each at least 1")
    return values


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ferstream eval-stream",
        description="Score a checkpoint on labelled faces pasted into H.264 video, through the service's detector and crop",
    )
    parser.add_argument("--data", required=True, help="ImageFolder tree (e.g. .../fer2013/val), fer2013.csv or a RAF-DB root")
    add_dataset_arguments(parser)
    parser.add_argument("--split", default=None, help="as for ferstream eval (default: --data itself for an ImageFolder)")
    parser.add_argument("--model", default=None, help="checkpoint (default: the shipped pipeline/assets/expression_default.pt)")
    parser.add_argument("--config", default=None, help="pipeline YAML whose detector: section to use (default: the service's default)")
    parser.add_argument("--limit", type=int_at_least(1), default=None, help="use this many images, evenly spaced over the split")
    parser.add_argument("--sizes", type=_int_list, default=DEFAULT_SIZES, help="face heights in px (default 24,32,48,64,96,128,200)")
    parser.add_argument("--bitrates", type=_int_list, default=DEFAULT_BITRATES, help="H.264 bitrates in kbit/s (default 250,500,1000,2000)")
    parser.add_argument("--width", type=int_at_least(1), default=640, help="frame width (default 640)")
    parser.add_argument("--height", type=int_at_least(1), default=360, help="frame height (default 360)")
    parser.add_argument("--gop", type=int_at_least(1), default=30, help="fixed GOP length in frames (default 30)")
    parser.add_argument("--hold", type=int_at_least(1), default=2, help="frames each layout is shown; the last one is scored (default 2)")
    parser.add_argument("--batch-size", type=int_at_least(1), default=256, help="classifier batch (default 256)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the result as JSON here")
    parser.add_argument("--plot", default=None, metavar="PNG", help="write accuracy vs face size, one line per bitrate")
    add_compute_arguments(parser)
    return parser


def _print_human(result: dict[str, Any]) -> None:
    def percent(value: float | None) -> str:
        return "-" if value is None else f"{value:.1%}"

    print(f"{result['model_id']} on {result['n']} faces, {result['detector']['kind']}, margin {result['margin']}")
    print(f"  clean: {percent(result['clean']['accuracy'])}  sad precision {percent(result['clean'].get('sad_precision'))}")
    header = "".join(f"{kbps:>14}" for kbps in result["bitrates_kbps"])
    print(f"  {'size':>5}{header}   (detected / accuracy)")
    for size in result["sizes"]:
        cells = []
        for kbps in result["bitrates_kbps"]:
            row = result["per_condition"][f"{size}px@{kbps}"]
            cells.append(f"{percent(row['detection_rate']):>7}/{percent(row['accuracy']):>6}")
        print(f"  {size:>5}" + "".join(f"{cell:>14}" for cell in cells))
    target = result["target"]
    print(
        f"  target (>= {target['min_size']} px, >= {target['min_kbps']} kbit/s): accuracy {percent(target['accuracy'])}, "
        f"sad precision {percent(target.get('sad_precision'))}, detected {percent(target['detection_rate'])}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    apply_threads(args)
    try:
        run = DetectorRun.from_args(args)
        for size in args.sizes:
            grid_layout(size, args.width, args.height)
    except (FileNotFoundError, CheckpointError, DatasetError, ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model, metadata, detector, detector_config = run.model, run.metadata, run.detector, run.detector_config
    dataset = run.loaded.dataset
    indices = evenly_spaced(len(dataset), args.limit)

    def predict(crops: list[np.ndarray]) -> np.ndarray:
        return predict_probabilities(model, metadata, crops, batch_size=args.batch_size)

    result: dict[str, Any] = run.description(args)
    result.update(
        evaluate_stream(
            dataset.images[indices],
            dataset.labels[indices],
            detector,
            predict,
            metadata,
            crop_margin(detector_config, metadata),
            sizes=args.sizes,
            bitrates=args.bitrates,
            width=args.width,
            height=args.height,
            gop=args.gop,
            hold=args.hold,
            detection_size=detector_config.detection_size,
        )
    )
    if args.json:
        path = Path(args.json).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
    if args.plot:
        write_plot(result, Path(args.plot).expanduser())
    _print_human(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
