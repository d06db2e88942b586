"""Grad-CAM saliency overlays (``ferstream explain IMAGE...``): where the model looks for its answer.

Selvaraju et al., "Grad-CAM: Visual explanations from deep networks via gradient-based localization"
(ICCV 2017): the feature maps ``A`` of a late convolution are weighted by the spatial mean of the
gradient of the explained class's logit with respect to them, ``ReLU(sum_c mean(dy/dA_c) * A_c)``,
and upsampled to the input. The layer explained is the last ``nn.Conv2d`` of the network; for an
ensemble it is the last convolution of every member, and their maps are summed, since the gradient
of the ensemble's output already weighs each member by its share in the answer.

The images are treated as face crops (as FER2013's are) and go through the service's own
:func:`pipeline.checkpoint.preprocess_crops`, so the map is of exactly what the model sees.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from pipeline.checkpoint import CheckpointError, ModelMetadata, default_checkpoint_path, load_checkpoint, preprocess_crops

__all__ = ["explained_layers", "grad_cam", "main", "save_overlay"]


def _last_conv(module: nn.Module) -> nn.Conv2d | None:
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1] if convs else None


def explained_layers(model: nn.Module) -> list[nn.Module]:
    """The last convolution of the network, or of each member when the model is an ensemble (has ``members``)."""
    members = getattr(model, "members", None)
    networks = list(members) if isinstance(members, nn.ModuleList) else [model]
    layers = [layer for layer in (_last_conv(network) for network in networks) if layer is not None]
    if not layers:
        raise CheckpointError("the model has no nn.Conv2d layer to explain")
    return layers


def grad_cam(
    model: nn.Module, inputs: Tensor, class_indices: Sequence[int] | None = None, layers: Sequence[nn.Module] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """N x H x W maps in [0, 1] (each image scaled to its own maximum) and the N x K probabilities.

    ``class_indices``: the class to explain per image (default: the predicted one).
    """
    model.eval()
    layers = list(layers) if layers is not None else explained_layers(model)
    activations: list[Tensor] = []

    def keep(_module: nn.Module, _inputs: Any, output: Tensor) -> None:
        output.retain_grad()
        activations.append(output)

    handles = [layer.register_forward_hook(keep) for layer in layers]
    try:
        with torch.enable_grad():
            x = inputs.detach().clone().requires_grad_(True)
            logits = model(x)
            chosen = logits.argmax(1) if class_indices is None else torch.as_tensor(list(class_indices), dtype=torch.long)
            model.zero_grad(set_to_none=True)
            logits.gather(1, chosen.view(-1, 1)).sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    side = inputs.shape[-2:]
    cam = torch.zeros(inputs.shape[0], 1, *side)
    for activation in activations:
        assert activation.grad is not None
        weights = activation.grad.mean(dim=(2, 3), keepdim=True)
        layer_cam = F.relu((weights * activation).sum(1, keepdim=True)).detach()
        cam += F.interpolate(layer_cam, size=side, mode="bilinear", align_corners=False)
    cam = cam[:, 0]
    peak = cam.flatten(1).max(1).values.clamp_min(1e-12).view(-1, 1, 1)
    return (cam / peak).numpy(), torch.softmax(logits.detach(), 1).numpy()


def _model_view(image: np.ndarray, metadata: ModelMetadata) -> np.ndarray:
    """The grayscale pixels the network sees (resized and centre-cropped, before normalization), for the overlay."""
    inputs = preprocess_crops([image], metadata)[0]
    std = torch.tensor(metadata.std).view(-1, 1, 1)
    mean = torch.tensor(metadata.mean).view(-1, 1, 1)
    return ((inputs * std + mean).mean(0).clamp(0, 1) * 255).numpy().astype(np.uint8)


def save_overlay(view: np.ndarray, cam: np.ndarray, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_face, ax_cam) = plt.subplots(1, 2, figsize=(6, 3.4))
    ax_face.imshow(view, cmap="gray", vmin=0, vmax=255)
    ax_face.set_title("model input")
    ax_cam.imshow(view, cmap="gray", vmin=0, vmax=255)
    ax_cam.imshow(cam, cmap="jet", alpha=0.45, vmin=0, vmax=1)
    ax_cam.set_title("Grad-CAM")
    for ax in (ax_face, ax_cam):
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _load_image(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        # BGR order, as the service's crops are (preprocess_crops converts to the model's channels).
        return np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8)[:, :, ::-1])


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ferstream explain", description="Grad-CAM overlays (PNG) showing which pixels of each face crop drive the model's answer"
    )
    parser.add_argument("images", nargs="+", help="face crop images (any size; they are preprocessed as the service does)")
    parser.add_argument("--model", default=None, help="checkpoint (default: the shipped pipeline/assets/expression_default.pt)")
    parser.add_argument("--output-dir", default="explain", help="where the <image stem>_gradcam.png files go")
    parser.add_argument("--class", dest="class_name", default=None, help="explain this class instead of the predicted one")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    model_path = Path(args.model).expanduser() if args.model else default_checkpoint_path()
    try:
        model, metadata = load_checkpoint(model_path)
        layers = explained_layers(model)
    except (FileNotFoundError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.class_name is not None and args.class_name not in metadata.classes:
        print(f"error: --class {args.class_name!r} is not one of the model's classes {list(metadata.classes)}", file=sys.stderr)
        return 2
    output_dir = Path(args.output_dir).expanduser()
    report = []
    for image_path in map(Path, args.images):
        try:
            image = _load_image(image_path)
        except (OSError, ValueError) as exc:
            print(f"error: {image_path}: {exc}", file=sys.stderr)
            return 2
        inputs = preprocess_crops([image], metadata)
        target = None if args.class_name is None else [metadata.classes.index(args.class_name)]
        cams, probabilities = grad_cam(model, inputs, target, layers)
        predicted = int(probabilities[0].argmax())
        explained = predicted if target is None else target[0]
        png = output_dir / f"{image_path.stem}_gradcam.png"
        title = (
            f"{image_path.name}: {metadata.classes[predicted]} {probabilities[0, predicted]:.0%} "
            f"(explaining {metadata.classes[explained]}; {metadata.model_id})"
        )
        save_overlay(_model_view(image, metadata), cams[0], png, title)
        report.append(
            {
                "image": str(image_path),
                "png": str(png),
                "predicted": metadata.classes[predicted],
                "probability": float(probabilities[0, predicted]),
                "explained_class": metadata.classes[explained],
            }
        )
    print(json.dumps({"model_id": metadata.model_id, "results": report}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
