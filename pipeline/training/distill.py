"""Knowledge distillation into a fast student (``ferstream distill``).

The teacher is any ferstream model file (typically an ensemble from ``ferstream ensemble``); the
student is trained by :func:`pipeline.training.train.train` with the same data, augmentation,
schedule, checkpoints and ``--resume auto``, and differs only in its objective (Hinton et al.,
"Distilling the knowledge in a neural network", 2015):

    loss = alpha * KL(softmax(teacher / T) || softmax(student / T)) * T^2 + (1 - alpha) * CE(student, smoothed labels)

The teacher runs online, in eval mode and without gradients, on exactly the augmented (and mixed)
batch the student sees, so the soft labels follow the augmentation instead of being cached for
the unaugmented images. ``T^2`` keeps the soft term's gradient scale independent of ``T``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.checkpoint import CheckpointError, ModelMetadata, load_checkpoint
from pipeline.training import train as trainer
from pipeline.training.loop import TrainingObjective

__all__ = ["DistillationObjective", "distillation_loss", "get_args_parser", "main"]


def distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    alpha: float,
    temperature: float,
    class_weights: Tensor | None = None,
) -> Tensor:
    """``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE(student, targets)``; targets are soft (N x K)."""
    soft = F.kl_div(
        F.log_softmax(student_logits / temperature, dim=1),
        F.log_softmax(teacher_logits / temperature, dim=1),
        reduction="batchmean",
        log_target=True,
    ) * (temperature * temperature)
    if alpha >= 1.0:
        return soft
    hard = F.cross_entropy(student_logits, targets, weight=class_weights)
    return alpha * soft + (1.0 - alpha) * hard


class DistillationObjective(TrainingObjective):
    """The teacher, loaded once, and the loss above."""

    def __init__(self, teacher_path: str | Path, alpha: float, temperature: float) -> None:
        self.teacher_path = Path(teacher_path).expanduser()
        self.teacher: nn.Module
        self.teacher, self.teacher_metadata = load_checkpoint(self.teacher_path)
        self.teacher.requires_grad_(False)
        self.alpha, self.temperature = alpha, temperature
        self._scale: Tensor | None = None
        self._shift: Tensor | None = None

    def bind(self, metadata: ModelMetadata, device: torch.device, memory_format: torch.memory_format) -> None:
        teacher = self.teacher_metadata
        for key in ("classes", "input_size", "grayscale"):
            if getattr(teacher, key) != getattr(metadata, key):
                raise CheckpointError(
                    f"teacher {self.teacher_path}: {key} {getattr(teacher, key)!r} differs from the student's {getattr(metadata, key)!r}"
                )
        # The batch is normalized with the student's statistics; the teacher gets its own back.
        channels = metadata.channels
        self._scale = torch.tensor([s / ts for s, ts in zip(metadata.std, teacher.std, strict=True)], device=device).view(1, channels, 1, 1)
        self._shift = torch.tensor(
            [(m - tm) / ts for m, tm, ts in zip(metadata.mean, teacher.mean, teacher.std, strict=True)], device=device
        ).view(1, channels, 1, 1)
        self.teacher = self.teacher.to(device=device, memory_format=memory_format).eval()

    def teacher_logits(self, inputs: Tensor) -> Tensor:
        assert self._scale is not None and self._shift is not None, "bind() first"
        # eval(): train() puts only the student in training mode, but be explicit: BN statistics and dropout stay frozen.
        self.teacher.eval()
        with torch.no_grad():
            return self.teacher(inputs * self._scale + self._shift).float()

    def loss(self, logits: Tensor, inputs: Tensor, targets: Tensor, class_weights: Tensor | None) -> Tensor:
        return distillation_loss(logits, self.teacher_logits(inputs), targets, self.alpha, self.temperature, class_weights)

    def metrics(self) -> dict[str, Any]:
        return {
            "distillation": {
                "teacher": str(self.teacher_path),
                "teacher_model_id": self.teacher_metadata.model_id,
                "teacher_val_accuracy": self.teacher_metadata.metrics.get("accuracy"),
                "alpha": self.alpha,
                "temperature": self.temperature,
            }
        }


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ferstream distill",
        description="Train a student on a teacher model's soft labels (plus label-smoothed hard labels); "
        "every `ferstream train` option applies, --resume auto included",
        parents=[trainer.get_args_parser(add_help=False)],
    )
    group = parser.add_argument_group("distillation")
    group.add_argument("--teacher", required=True, help="teacher model file (an ensemble from `ferstream ensemble`, or any checkpoint)")
    group.add_argument("--kd-alpha", type=float, default=0.7, help="weight of the soft (teacher) term; 1 - alpha goes to the hard labels")
    group.add_argument("--kd-temperature", type=float, default=4.0, help="softmax temperature of the soft term")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if not 0.0 <= args.kd_alpha <= 1.0:
        print(f"error: --kd-alpha must be in [0, 1], got {args.kd_alpha}", file=sys.stderr)
        return 2
    if not (math.isfinite(args.kd_temperature) and args.kd_temperature > 0):
        print(f"error: --kd-temperature must be > 0, got {args.kd_temperature}", file=sys.stderr)
        return 2
    return trainer.execute(args, argv, lambda a: DistillationObjective(a.teacher, a.kd_alpha, a.kd_temperature))


if __name__ == "__main__":
    raise SystemExit(main())
