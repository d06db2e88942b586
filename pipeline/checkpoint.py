"""The shipped-model contract: one ``.pt`` file holding weights plus the metadata needed to use them.

The service's classifier and the trainer's evaluation both go through :func:`preprocess_crops`,
so a face crop is turned into a tensor in exactly one way everywhere. An ONNX export of a
checkpoint (``ferstream export --format onnx``) carries the same metadata in its
``metadata_props``; ``pipeline.runtimes.onnx_runtime.load_onnx`` opens one with ONNX Runtime.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.architectures import build_model, known_architectures

__all__ = [
    "CHECKPOINT_FORMAT",
    "ONNX_INPUT",
    "ONNX_METADATA_KEY",
    "ONNX_OUTPUT",
    "CheckpointError",
    "ModelMetadata",
    "default_checkpoint_path",
    "load_checkpoint",
    "preprocess_crops",
    "save_checkpoint",
]

CHECKPOINT_FORMAT = "ferstream-expression/1"

# The ONNX export's contract (pipeline/training/export.py writes it, pipeline/runtimes/onnx_runtime.py reads it): input
# ``faces`` N x C x S x S (already preprocessed), output ``logits`` N x classes, and the
# ModelMetadata as JSON under this metadata_props key.
ONNX_INPUT = "faces"
ONNX_OUTPUT = "logits"
ONNX_METADATA_KEY = "ferstream_metadata"

# BGR (OpenCV order) -> luma, ITU-R BT.601 weights: the same formula PIL's convert("L") and
# cv2.cvtColor(BGR2GRAY) use, so colour camera crops match the grayscale FER2013 statistics.
_BGR_TO_GRAY = np.array([0.114, 0.587, 0.299], dtype=np.float32)


class CheckpointError(ValueError):
    """The file is not a ferstream expression checkpoint (or names an unknown architecture)."""


@dataclass(frozen=True)
class ModelMetadata:
    model_id: str
    arch: str
    arch_kwargs: dict[str, Any]
    classes: tuple[str, ...]
    input_size: int  # square side the network sees (e.g. 48, or 44 after a centre crop)
    resize_to: int  # faces are resized to this square first (48, matching FER2013), then centre-cropped to input_size
    grayscale: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    face_margin: float  # relative enlargement of a detector box (each side) to match FER2013's loose framing
    metrics: dict[str, Any] = field(default_factory=dict)  # validation metrics recorded at selection time

    def __post_init__(self) -> None:
        if self.input_size > self.resize_to:
            raise ValueError(f"input_size {self.input_size} is larger than resize_to {self.resize_to}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(f"mean/std need {self.channels} value(s) for grayscale={self.grayscale}")

    @property
    def channels(self) -> int:
        return 1 if self.grayscale else 3

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        # Lists rather than tuples: plain containers survive torch.load(weights_only=True) and JSON alike.
        for key in ("classes", "mean", "std"):
            data[key] = list(data[key])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelMetadata:
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(names - set(data) - {"metrics"})
        if missing:
            raise CheckpointError(f"checkpoint metadata lacks {', '.join(missing)}")
        values = {k: v for k, v in data.items() if k in names}
        for key in ("classes", "mean", "std"):
            values[key] = tuple(values[key])
        values["arch_kwargs"] = dict(values["arch_kwargs"])
        return cls(**values)


def default_checkpoint_path() -> Path:
    """The model shipped inside the package (what the service loads unless configured otherwise)."""
    return Path(__file__).resolve().parent / "assets" / "expression_default.pt"


def save_checkpoint(path: str | Path, model: nn.Module, metadata: ModelMetadata) -> None:
    """Weights + metadata only (no optimizer state): the shipped/inference format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # contiguous(): a channels_last training model must not leak its memory layout into the file.
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    payload = {"format": CHECKPOINT_FORMAT, "metadata": metadata.to_dict(), "state_dict": state}
    # Write then rename so a reader (or a crash) never sees a half-written file.
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, ModelMetadata]:
    """Rebuild the architecture named in the file, load its weights, and return it in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        # weights_only: a model file is data, never code to execute.
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means "not our format"
        raise CheckpointError(f"{path} is not a readable {CHECKPOINT_FORMAT} checkpoint: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path} has format {found!r}, expected {CHECKPOINT_FORMAT!r}")
    metadata = ModelMetadata.from_dict(payload["metadata"])
    if metadata.arch not in known_architectures():
        raise CheckpointError(
            f"{path} needs architecture {metadata.arch!r}, which this version does not know ({', '.join(known_architectures())})"
        )
    kwargs = {"in_channels": metadata.channels, **metadata.arch_kwargs}
    model = build_model(metadata.arch, len(metadata.classes), **kwargs)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit architecture {metadata.arch!r}: {exc}") from exc
    model.to(map_location).eval()
    return model, metadata


def _to_channels(crop: np.ndarray, grayscale: bool) -> np.ndarray:
    """uint8 HxW or HxWx{1,3,4} (BGR[A]) -> float32 CxHxW with the model's channel count (RGB order when colour)."""
    if crop.ndim == 3 and crop.shape[2] == 1:
        crop = crop[:, :, 0]
    if crop.ndim == 2:
        gray = crop.astype(np.float32)
        return gray[None] if grayscale else np.repeat(gray[None], 3, axis=0)
    if crop.ndim == 3 and crop.shape[2] in (3, 4):
        bgr = crop[:, :, :3].astype(np.float32)
        if grayscale:
            return (bgr @ _BGR_TO_GRAY)[None]
        return np.ascontiguousarray(bgr[:, :, ::-1].transpose(2, 0, 1))
    raise ValueError(f"expected an HxW or HxWx3 uint8 crop, got shape {crop.shape}")


def preprocess_crops(crops: Sequence[np.ndarray], metadata: ModelMetadata) -> torch.Tensor:
    """uint8 face crops (HxW gray or HxWx3 BGR, any size) -> N x C x input_size x input_size float tensor.

    Steps: to the model's channels -> resize to ``resize_to`` (bilinear, antialiased when
    shrinking) -> centre crop ``input_size`` -> /255 -> (x - mean) / std. This is exactly
    the evaluation transform of training (the trainer calls this function on its val set).
    """
    channels = metadata.channels
    side, size = metadata.input_size, metadata.resize_to
    if len(crops) == 0:
        return torch.empty((0, channels, side, side), dtype=torch.float32)
    for crop in crops:
        if crop.dtype != np.uint8:
            raise ValueError(f"face crops must be uint8, got {crop.dtype}")
        if crop.size == 0:
            raise ValueError(f"empty face crop of shape {crop.shape}")
    arrays = [_to_channels(np.asarray(crop), metadata.grayscale) for crop in crops]
    if all(a.shape[1:] == (size, size) for a in arrays):
        # Fast path (the training/eval arrays are already 48x48): one stacked tensor, no resize.
        batch = torch.from_numpy(np.stack(arrays))
    else:
        resized = []
        for array in arrays:
            tensor = torch.from_numpy(array)[None]
            if tensor.shape[-2:] != (size, size):
                shrinking = tensor.shape[-2] > size or tensor.shape[-1] > size
                tensor = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False, antialias=shrinking)
            resized.append(tensor)
        # Round and clamp like an 8-bit resize would, so a crop resized here matches the same crop
        # stored as a 48x48 uint8 image (as the FER2013 training data is).
        batch = torch.cat(resized).round_().clamp_(0, 255)
    offset = (size - side) // 2
    batch = batch[:, :, offset : offset + side, offset : offset + side]
    mean = torch.tensor(metadata.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(metadata.std, dtype=torch.float32).view(1, -1, 1, 1)
    return ((batch / 255.0 - mean) / std).contiguous()
