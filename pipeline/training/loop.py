"""One epoch of training and one evaluation: the two steps ``ferstream train`` repeats.

As in torchvision's ``references/classification``: :meth:`TrainingLoop.train_one_epoch` and
:func:`evaluate` here, the data in :mod:`pipeline.training.data`, and the run (arguments, resume,
checkpoints) in :mod:`pipeline.training.train`.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from pipeline.checkpoint import ModelMetadata
from pipeline.training.augment import TensorAugment, mix_batch
from pipeline.training.evaluate import confusion_matrix, metrics_from_confusion

__all__ = [
    "CrossEntropyObjective",
    "TrainingLoop",
    "TrainingObjective",
    "CosineSchedule",
    "class_weights_for",
    "epochs_within_budget",
    "epoch_order",
    "epoch_seed",
    "evaluate",
    "make_optimizer",
    "make_scheduler",
    "predict_logits",
]


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


class CosineSchedule:
    """LambdaLR factor: linear warmup, then cosine decay to ``min_ratio`` at ``total_steps``.

    An object, not a closure, because LambdaLR's state_dict then keeps ``total_steps``: a time
    budget (``--time-budget``) changes it during the run, and a resume must continue that schedule.
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float) -> None:
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(args: argparse.Namespace, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> Any:
    warmup = max(0, int(round(args.lr_warmup_epochs * steps_per_epoch)))
    if args.lr_scheduler == "cosine":
        schedule = CosineSchedule(warmup, max(1, args.epochs * steps_per_epoch), args.lr_min_ratio)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=args.plateau_factor, patience=args.plateau_patience)


def epochs_within_budget(done: int, wanted: int, epoch_times_s: list[float], remaining_s: float) -> int:
    """How many epochs in all a run can plan: ``done`` plus those that fit ``remaining_s`` at the mean
    epoch time so far, at most ``wanted`` and never fewer than ``done``.

    The mean of every epoch but the first (which pays one-time costs) once there are three: on a
    shared VM one epoch took 86 s and the next 151 s, and a plan following the last few epochs swung
    from 24 to 33 to 22 epochs, moving the learning rate up and down with it."""
    if not epoch_times_s:
        return wanted
    steady = epoch_times_s[1:] if len(epoch_times_s) >= 3 else epoch_times_s
    per_epoch = max(sum(steady) / len(steady), 1e-6)
    return max(done, min(wanted, done + int(max(0.0, remaining_s) // per_epoch)))


def make_optimizer(args: argparse.Namespace, model: nn.Module) -> torch.optim.Optimizer:
    if args.opt == "sgd":
        return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, nesterov=True, weight_decay=args.wd)
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.wd)


def class_weights_for(labels: np.ndarray, num_classes: int) -> Tensor:
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    # Inverse frequency, normalized so the average weight per *sample* is 1 (keeps the loss scale/LR meaningful).
    weights = np.where(counts > 0, counts.sum() / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def epoch_order(labels: Tensor, mode: str, generator: torch.Generator, num_classes: int) -> Tensor:
    n = labels.shape[0]
    if mode == "sampler":
        counts = torch.bincount(labels, minlength=num_classes).float()
        per_sample = (1.0 / counts.clamp(min=1))[labels]
        return torch.multinomial(per_sample, n, replacement=True, generator=generator)
    return torch.randperm(n, generator=generator)


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    inputs: Tensor,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    memory_format: torch.memory_format = torch.contiguous_format,
) -> Tensor:
    model.eval()
    outputs = [
        model(inputs[i : i + batch_size].to(device).contiguous(memory_format=memory_format)).float().cpu()
        for i in range(0, inputs.shape[0], batch_size)
    ]
    return torch.cat(outputs) if outputs else torch.empty((0, 0))


def evaluate(
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    classes: tuple[str, ...] | list[str],
    device: torch.device | str = "cpu",
    memory_format: torch.memory_format = torch.contiguous_format,
) -> tuple[float, dict[str, Any]]:
    """Cross-entropy and the ``ferstream eval`` metrics (accuracy, per-class, macro, confusion) of ``model`` on a split."""
    logits = predict_logits(model, inputs, device=device, memory_format=memory_format)
    loss = float(F.cross_entropy(logits, labels))
    cm = confusion_matrix(labels.numpy(), logits.argmax(1).numpy(), len(classes))
    return loss, metrics_from_confusion(cm, list(classes))


class TrainingObjective:
    """What a training step minimizes. ``train`` owns everything else (data, schedule, checkpoints, resume).

    ``bind`` is called once the run's model metadata (classes, input normalization) and device are
    known, before the first step; ``metrics`` is recorded in every best.pt the run writes.
    """

    def bind(self, metadata: ModelMetadata, device: torch.device, memory_format: torch.memory_format) -> None:
        """Nothing to prepare for a plain objective."""

    def loss(self, logits: Tensor, inputs: Tensor, targets: Tensor, class_weights: Tensor | None) -> Tensor:
        raise NotImplementedError

    def metrics(self) -> dict[str, Any]:
        return {}


class CrossEntropyObjective(TrainingObjective):
    """Cross-entropy against the (label-smoothed, mixed) soft targets: ``ferstream train``."""

    def loss(self, logits: Tensor, inputs: Tensor, targets: Tensor, class_weights: Tensor | None) -> Tensor:
        return F.cross_entropy(logits, targets, weight=class_weights)


@dataclass
class TrainingLoop:
    """The per-run constants of the training loop; :meth:`train_one_epoch` is one epoch of it."""

    args: argparse.Namespace
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler | None
    objective: TrainingObjective
    augment: TensorAugment
    train_images: Tensor
    train_labels: Tensor
    n_train: int
    batch_size: int
    steps_per_epoch: int
    warmup_steps: int
    num_classes: int
    class_weights: Tensor | None
    device: torch.device
    memory_format: torch.memory_format

    def plan_epochs(self, epochs: int) -> None:
        """End the cosine schedule at ``epochs`` (a time budget's plan); the plateau schedule has no end."""
        if isinstance(self.scheduler, torch.optim.lr_scheduler.LambdaLR):
            schedule = self.scheduler.lr_lambdas[0]
            schedule.total_steps = max(1, epochs * self.steps_per_epoch)

    def train_one_epoch(self, epoch: int) -> tuple[float, float]:
        """Mean training loss and accuracy (on the augmented batches) of epoch ``epoch`` (0-based)."""
        args, model, optimizer = self.args, self.model, self.optimizer
        # Everything random in this epoch derives from (seed, epoch): exact resume at epoch boundaries.
        generator = torch.Generator().manual_seed(epoch_seed(args.seed, epoch))
        torch.manual_seed(epoch_seed(args.seed, epoch))  # dropout
        rng = np.random.default_rng([args.seed, epoch])
        order = epoch_order(self.train_labels, args.class_balance, generator, self.num_classes)[: self.n_train]
        model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        bar = tqdm(
            range(self.steps_per_epoch),
            desc=f"epoch {epoch + 1}/{args.epochs}",
            disable=args.no_progress,
            mininterval=1.0 if sys.stderr.isatty() else 30.0,
            leave=False,
        )
        for step in bar:
            global_step = epoch * self.steps_per_epoch + step
            if args.lr_scheduler == "plateau" and global_step < self.warmup_steps:
                for group in optimizer.param_groups:
                    group["lr"] = group.setdefault("initial_lr", args.lr) * (global_step + 1) / self.warmup_steps
            index = order[step * self.batch_size : (step + 1) * self.batch_size]
            labels = self.train_labels[index]
            inputs = self.augment(self.train_images[index], generator)
            targets = F.one_hot(labels, self.num_classes).float()
            if args.label_smoothing > 0:
                targets = targets * (1.0 - args.label_smoothing) + args.label_smoothing / self.num_classes
            inputs, targets = mix_batch(inputs, targets, args.mixup_alpha, args.cutmix_alpha, args.mix_prob, rng, generator)
            inputs = inputs.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
            targets, labels = targets.to(self.device), labels.to(self.device)
            with torch.autocast(self.device.type, enabled=self.scaler is not None):
                logits = model(inputs)
                loss = self.objective.loss(logits, inputs, targets, self.class_weights)
            optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.step(optimizer)
                self.scaler.update()
            else:
                loss.backward()
                optimizer.step()
            if args.lr_scheduler == "cosine":
                self.scheduler.step()
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"loss became {loss_value} at epoch {epoch + 1} step {step}; lower --lr")
            loss_sum += loss_value * labels.shape[0]
            correct += int((logits.detach().argmax(1) == labels).sum())
            seen += labels.shape[0]
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", refresh=False)
        bar.close()
        return loss_sum / max(seen, 1), correct / max(seen, 1)
