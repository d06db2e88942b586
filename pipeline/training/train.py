"""Flat trainer for the expression classifier (``ferstream train``).

In the spirit of torchvision's ``references/classification/train.py``: one argparse namespace,
one loop, a checkpoint every epoch that resumes exactly. Built for a small shared CPU:

* the whole split lives in RAM as uint8 (see :mod:`pipeline.training.data`); augmentation runs
  batched on tensors (one ``affine_grid``/``grid_sample`` call does crop+scale+rotation+flip
  for a whole batch) instead of PIL per image in worker processes;
* validation goes through :func:`pipeline.checkpoint.preprocess_crops`, the exact transform the
  service applies, so the recorded val metrics are what the shipped model does;
* every random draw of epoch ``e`` comes from generators seeded by ``(seed, e)``, and the
  end-of-epoch checkpoint holds model/optimizer/scheduler/scaler/RNG state, so an interrupted
  run resumed with ``--resume auto`` produces bit-identical weights (on the same machine and
  thread count).

Model selection: the epoch with the best val top-1 accuracy (``--select-metric``, default
``accuracy``, because the product target is stated in top-1); macro-F1 is recorded alongside and
can be selected instead. Early stopping (``--patience``) watches the same metric.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from pipeline.architectures import ARCHITECTURES, build_model, count_parameters
from pipeline.checkpoint import CheckpointError, ModelMetadata, load_checkpoint, preprocess_crops, save_checkpoint
from pipeline.training.augment import TensorAugment, mix_batch
from pipeline.training.data import (
    FER_CLASSES,
    SPLITS,
    DatasetError,
    ImageDataset,
    add_dataset_arguments,
    load_split_from_args,
    resolve_format,
)
from pipeline.training.evaluate import confusion_matrix, metrics_from_confusion

__all__ = [
    "CrossEntropyObjective",
    "TensorAugment",
    "TrainingLoop",
    "TrainingObjective",
    "data_selection",
    "execute",
    "get_args_parser",
    "load_data",
    "main",
    "run_training",
    "train",
]

CHECKPOINT_STATE_FORMAT = "ferstream-train-state/1"
METRIC_FIELDS = (
    "epoch",
    "lr",
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "val_macro_f1",
    "epoch_time_s",
    "wall_time_s",
    "best",
)


def default_runs_dir() -> Path:
    return Path(os.environ.get("FERSTREAM_CACHE", Path.home() / ".cache" / "ferstream")) / "runs"


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ferstream train", description="Train the ferstream expression classifier", add_help=add_help)
    parser.add_argument(
        "--data-path",
        required=True,
        help="folder with train/ and val/ ImageFolder trees (<split>/<class>/*.jpg), a fer2013.csv or a RAF-DB root (see --data-format)",
    )
    parser.add_argument("--train-dir", default="train", help="train split folder name under --data-path")
    parser.add_argument("--val-dir", default="val", help="validation split folder name under --data-path")
    add_dataset_arguments(parser)
    parser.add_argument(
        "--val-usage",
        default="PublicTest",
        choices=("PublicTest", "PrivateTest"),
        help="fer2013.csv/FER+ Usage to validate on (train is Training; RAF-DB: train/test)",
    )
    parser.add_argument("--arch", default="compact", choices=sorted(ARCHITECTURES))
    parser.add_argument("--dropout", type=float, default=None, help="override the architecture's dropout before the classifier")
    parser.add_argument("--name", default=None, help="run name (default: the arch); output goes to ~/.cache/ferstream/runs/<name>")
    parser.add_argument("--output-dir", default=None, help="run folder (default ~/.cache/ferstream/runs/<name>)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--opt", default="sgd", choices=("sgd", "adamw"), help="sgd is Nesterov SGD with --momentum")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--wd", "--weight-decay", dest="wd", type=float, default=5e-4)
    parser.add_argument("--lr-scheduler", default="cosine", choices=("cosine", "plateau"))
    parser.add_argument("--lr-warmup-epochs", type=float, default=1.0, help="linear warmup from ~0 (per iteration)")
    parser.add_argument("--lr-min-ratio", type=float, default=0.0, help="cosine floor as a fraction of --lr")
    parser.add_argument("--plateau-factor", type=float, default=0.5)
    parser.add_argument("--plateau-patience", type=int, default=3)
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument("--mixup-alpha", type=float, default=0.0)
    parser.add_argument("--cutmix-alpha", type=float, default=0.0)
    parser.add_argument("--mix-prob", type=float, default=1.0, help="probability a batch is mixed when mixup/cutmix is on")
    parser.add_argument("--resize-to", type=int, default=48, help="images are loaded at this square size (FER2013: 48)")
    parser.add_argument("--input-size", type=int, default=44, help="network input side: random crop in training, centre crop at eval")
    parser.add_argument("--scale", type=float, nargs=2, default=(0.9, 1.1), metavar=("MIN", "MAX"), help="random zoom range")
    parser.add_argument("--translate", type=float, default=None, help="max shift in pixels (default: the crop margin)")
    parser.add_argument("--rotation", type=float, default=10.0, help="max rotation in degrees")
    parser.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability")
    parser.add_argument("--color-jitter", type=float, default=0.0, help="brightness/contrast jitter strength")
    parser.add_argument("--random-erase", type=float, default=0.0, help="random erasing probability")
    parser.add_argument("--class-balance", default="none", choices=("none", "weighted-loss", "sampler"))
    parser.add_argument(
        "--select-metric", default="accuracy", choices=("accuracy", "macro_f1"), help="val metric for best.pt and early stopping"
    )
    parser.add_argument("--patience", type=int, default=0, help="stop after this many epochs without improvement (0 = never)")
    parser.add_argument("--min-delta", type=float, default=0.0, help="improvement smaller than this does not count")
    parser.add_argument(
        "--face-margin",
        type=float,
        default=0.0,
        # Calibrated on FER2013 val with the service's MTCNN: its boxes already span the whole 48x48 FER
        # framing (median fitting margin -0.02), and service-crop accuracy drops as the margin grows (see MODEL_CARD.md).
        help="detector-box enlargement per side recorded in the checkpoint for the service's face crop",
    )
    parser.add_argument(
        "--init-from",
        default=None,
        help="start from this checkpoint's weights (same --arch and classes) instead of a random init; ignored when resuming",
    )
    parser.add_argument("--resume", default="", help="'auto' (last.pt in the output dir, if any) or a path to a training-state file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = all cores)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument(
        "--memory-format",
        default="channels_last",
        choices=("channels_last", "contiguous"),
        help="channels_last is ~25%% faster for these convs on oneDNN CPUs",
    )
    parser.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    parser.add_argument("--no-cache", action="store_true", help="decode images instead of using the decoded-array cache")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    parser.add_argument("--train-limit", type=int, default=0, help="use only the first N training images per epoch order (debugging)")
    parser.add_argument("--stop-after", type=int, default=0, help=argparse.SUPPRESS)  # tests: simulate an interruption
    return parser


# --------------------------------------------------------------------------- augmentation


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def _make_scheduler(args: argparse.Namespace, optimizer: torch.optim.Optimizer, steps_per_epoch: int) -> Any:
    warmup = max(0, int(round(args.lr_warmup_epochs * steps_per_epoch)))
    if args.lr_scheduler == "cosine":
        total = max(1, args.epochs * steps_per_epoch)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return args.lr_min_ratio + (1.0 - args.lr_min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=args.plateau_factor, patience=args.plateau_patience)


def _class_weights(labels: np.ndarray, num_classes: int) -> Tensor:
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    # Inverse frequency, normalized so the average weight per *sample* is 1 (keeps the loss scale/LR meaningful).
    weights = np.where(counts > 0, counts.sum() / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def _epoch_order(labels: Tensor, mode: str, generator: torch.Generator, num_classes: int) -> Tensor:
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


def _write_metrics(output_dir: Path, history: list[dict[str, Any]]) -> None:
    # Rewritten whole every epoch from the checkpointed history, so the files stay consistent after a resume.
    with open(output_dir / "metrics.csv.tmp", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=METRIC_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    (output_dir / "metrics.csv.tmp").replace(output_dir / "metrics.csv")
    with open(output_dir / "metrics.jsonl.tmp", "w") as handle:
        for row in history:
            handle.write(json.dumps(row, sort_keys=True) + "\n")
    (output_dir / "metrics.jsonl.tmp").replace(output_dir / "metrics.jsonl")


def _plot_curves(output_dir: Path, history: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(15, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in history], label="train (augmented)")
    ax_loss.plot(epochs, [r["val_loss"] for r in history], label="val")
    ax_loss.set(title="loss", xlabel="epoch")
    ax_acc.plot(epochs, [r["train_accuracy"] for r in history], label="train acc (augmented)")
    ax_acc.plot(epochs, [r["val_accuracy"] for r in history], label="val acc")
    ax_acc.plot(epochs, [r["val_macro_f1"] for r in history], label="val macro-F1")
    ax_acc.set(title="accuracy", xlabel="epoch")
    ax_lr.plot(epochs, [r["lr"] for r in history])
    ax_lr.set(title="learning rate (end of epoch)", xlabel="epoch")
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(output_dir / "curves.png", dpi=90)
    plt.close(fig)


def _resolve_resume(args: argparse.Namespace, output_dir: Path) -> Path | None:
    if not args.resume:
        return None
    if args.resume == "auto":
        last = output_dir / "last.pt"
        return last if last.is_file() else None
    path = Path(args.resume).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--resume {path}: no such training-state file")
    return path


def data_selection(args: argparse.Namespace) -> dict[str, str]:
    """The data format and train/val splits that --data-path, --data-format, --train-dir/--val-dir, --val-usage select."""
    data_path = Path(args.data_path).expanduser()
    fmt = resolve_format(data_path, args.data_format, args.ferplus_csv)
    if fmt == "imagefolder":
        train_split, val_split = args.train_dir, args.val_dir
    elif fmt == "rafdb":
        train_split, val_split = SPLITS[fmt]
    else:
        train_split, val_split = SPLITS[fmt][0], args.val_usage
    val_data = data_path / val_split if fmt == "imagefolder" else data_path
    return {"data_format": fmt, "train_split": train_split, "val_split": val_split, "val_data": str(val_data)}


# Changed between a run and its resume, these get a warning. A state saved before an option existed holds its default.
RESUME_CHECKED_ARGS = ("arch", "epochs", "seed", "lr", "opt", "lr_scheduler", "batch_size", "input_size")
RESUME_CHECKED_DATA_ARGS = ("data_format", "ferplus_csv", "label_scheme", "skip_classes", "val_usage")


# --------------------------------------------------------------------------- objectives


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


# --------------------------------------------------------------------------- training


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

    def train_one_epoch(self, epoch: int) -> tuple[float, float]:
        """Mean training loss and accuracy (on the augmented batches) of epoch ``epoch`` (0-based)."""
        args, model, optimizer = self.args, self.model, self.optimizer
        # Everything random in this epoch derives from (seed, epoch): exact resume at epoch boundaries.
        generator = torch.Generator().manual_seed(_epoch_seed(args.seed, epoch))
        torch.manual_seed(_epoch_seed(args.seed, epoch))  # dropout
        rng = np.random.default_rng([args.seed, epoch])
        order = _epoch_order(self.train_labels, args.class_balance, generator, self.num_classes)[: self.n_train]
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


def _initial_weights(path: str, arch: str, classes: tuple[str, ...]) -> dict[str, Tensor]:
    model, metadata = load_checkpoint(Path(path).expanduser())
    if metadata.arch != arch or metadata.classes != classes:
        raise CheckpointError(
            f"--init-from {path}: it is a {metadata.arch!r} model over {list(metadata.classes)}, "
            f"the run trains {arch!r} over {list(classes)}"
        )
    return model.state_dict()


def train(
    args: argparse.Namespace,
    train_set: ImageDataset,
    val_set: ImageDataset,
    output_dir: Path,
    objective: TrainingObjective | None = None,
    on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train and write best.pt/last.pt/metrics into ``output_dir``.

    ``on_epoch_end`` gets each epoch's metrics row once that epoch's last.pt is on disk (``ferstream
    automl`` reports it to Ray Tune with last.pt as the trial's checkpoint).
    """
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    num_classes = len(train_set.classes)
    arch_kwargs: dict[str, Any] = {} if args.dropout is None else {"dropout": args.dropout}
    # Mean/std from the training images (pixel statistics), rounded so the metadata stays readable.
    mean = round(float(train_set.images.mean()) / 255.0, 4)
    std = round(float(train_set.images.std()) / 255.0, 4)
    name = args.name or args.arch
    selection = data_selection(args)
    base_metadata = ModelMetadata(
        model_id=name,
        arch=args.arch,
        arch_kwargs=arch_kwargs,
        classes=tuple(train_set.classes),
        input_size=args.input_size,
        resize_to=args.resize_to,
        grayscale=True,
        mean=(mean,),
        std=(std,),
        face_margin=args.face_margin,
        metrics={},
    )

    objective = objective or CrossEntropyObjective()
    torch.manual_seed(args.seed)
    model = build_model(args.arch, num_classes, **arch_kwargs).to(device)
    init_from = getattr(args, "init_from", None)
    if init_from:
        model.load_state_dict(_initial_weights(init_from, args.arch, tuple(train_set.classes)))
    memory_format = torch.channels_last if args.memory_format == "channels_last" else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    if args.opt == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            model.parameters(), lr=args.lr, momentum=args.momentum, nesterov=True, weight_decay=args.wd
        )
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.wd)
    train_images = torch.from_numpy(train_set.images)
    train_labels = torch.from_numpy(train_set.labels)
    n_train = len(train_set) if args.train_limit <= 0 else min(args.train_limit, len(train_set))
    batch_size = min(args.batch_size, n_train)
    # drop_last: a 1-sample tail batch would make BatchNorm statistics meaningless.
    steps_per_epoch = max(1, n_train // batch_size)
    scheduler = _make_scheduler(args, optimizer, steps_per_epoch)
    warmup_steps = max(0, int(round(args.lr_warmup_epochs * steps_per_epoch)))
    scaler = torch.amp.GradScaler("cuda") if args.amp and device.type == "cuda" else None
    class_weights = _class_weights(train_set.labels, num_classes).to(device) if args.class_balance == "weighted-loss" else None
    augment = TensorAugment(
        args.input_size,
        args.resize_to,
        mean,
        std,
        scale=tuple(args.scale),
        translate_px=args.translate,
        rotation_deg=args.rotation,
        hflip=args.hflip,
        color_jitter=args.color_jitter,
        random_erase=args.random_erase,
    )
    objective.bind(base_metadata, device, memory_format)
    loop = TrainingLoop(
        args=args,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        objective=objective,
        augment=augment,
        train_images=train_images,
        train_labels=train_labels,
        n_train=n_train,
        batch_size=batch_size,
        steps_per_epoch=steps_per_epoch,
        warmup_steps=warmup_steps,
        num_classes=num_classes,
        class_weights=class_weights,
        device=device,
        memory_format=memory_format,
    )
    # The val tensor is built once, through the serving transform.
    val_inputs = preprocess_crops(list(val_set.images), base_metadata)
    val_labels = torch.from_numpy(val_set.labels)

    start_epoch, best_score, best_epoch, bad_epochs, wall_time = 0, -math.inf, -1, 0, 0.0
    history: list[dict[str, Any]] = []
    resume_path = _resolve_resume(args, output_dir)
    if resume_path is not None:
        state = torch.load(resume_path, map_location=device, weights_only=False)
        if state.get("format") != CHECKPOINT_STATE_FORMAT:
            raise ValueError(f"{resume_path} is not a training-state file ({CHECKPOINT_STATE_FORMAT})")
        defaults = get_args_parser()
        for key in RESUME_CHECKED_ARGS + RESUME_CHECKED_DATA_ARGS:
            recorded = state["args"].get(key, defaults.get_default(key))
            if recorded != getattr(args, key):
                print(f"warning: resuming with --{key.replace('_', '-')} {getattr(args, key)!r}, the run used {recorded!r}", flush=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        np.random.set_state(state["rng"]["numpy"])
        random.setstate(state["rng"]["python"])
        start_epoch, best_score, best_epoch = state["epoch"] + 1, state["best_score"], state["best_epoch"]
        bad_epochs, wall_time, history = state["bad_epochs"], state["wall_time_s"], state["history"]
        print(
            f"resumed from {resume_path} at epoch {start_epoch} (best {args.select_metric} {best_score:.4f} at epoch {best_epoch})",
            flush=True,
        )

    print(
        f"arch={args.arch} params={count_parameters(model):,} train={len(train_set)} val={len(val_set)} "
        f"steps/epoch={steps_per_epoch} device={device} threads={torch.get_num_threads()} output={output_dir}",
        flush=True,
    )
    stopped_early = False
    epochs_run = 0
    for epoch in range(start_epoch, args.epochs):
        if args.patience > 0 and bad_epochs >= args.patience:
            stopped_early = True
            break
        epoch_start = time.perf_counter()
        train_loss, train_accuracy = loop.train_one_epoch(epoch)

        logits = predict_logits(model, val_inputs, device=device, memory_format=memory_format)
        val_loss = float(F.cross_entropy(logits, val_labels))
        cm = confusion_matrix(val_labels.numpy(), logits.argmax(1).numpy(), num_classes)
        val_metrics = metrics_from_confusion(cm, train_set.classes)
        score = val_metrics["accuracy"] if args.select_metric == "accuracy" else val_metrics["macro"]["f1"]
        if args.lr_scheduler == "plateau" and (epoch + 1) * steps_per_epoch >= warmup_steps:
            scheduler.step(score)
        improved = score > best_score + args.min_delta
        epoch_time = time.perf_counter() - epoch_start
        wall_time += epoch_time
        row = {
            "epoch": epoch + 1,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": train_loss,
            "train_accuracy": train_accuracy,
            "val_loss": val_loss,
            "val_accuracy": val_metrics["accuracy"],
            "val_macro_f1": val_metrics["macro"]["f1"],
            "epoch_time_s": round(epoch_time, 2),
            "wall_time_s": round(wall_time, 2),
            "best": improved,
        }
        history.append(row)
        if improved:
            best_score, best_epoch, bad_epochs = score, epoch + 1, 0
            metrics = {
                "epoch": epoch + 1,
                "selected_by": f"val {args.select_metric}",
                # Same key names as `ferstream eval` output, measured on the split named by "split".
                "split": "val",
                "data": selection["val_data"],
                "data_format": selection["data_format"],
                "data_split": selection["val_split"],
                "accuracy": val_metrics["accuracy"],
                "macro_f1": val_metrics["macro"]["f1"],
                "loss": val_loss,
                "n": len(val_set),
                "per_class_recall": {c: val_metrics["per_class"][c]["recall"] for c in train_set.classes},
                "confusion_matrix": val_metrics["confusion_matrix"],
                "train_n": len(train_set),
                "params": count_parameters(model),
                **objective.metrics(),
            }
            metadata = dataclasses.replace(base_metadata, model_id=f"{name}-e{epoch + 1:03d}", metrics=metrics)
            save_checkpoint(output_dir / "best.pt", model, metadata)
        else:
            bad_epochs += 1
        state = {
            "format": CHECKPOINT_STATE_FORMAT,
            "args": vars(args),
            "epoch": epoch,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
            "best_score": best_score,
            "best_epoch": best_epoch,
            "bad_epochs": bad_epochs,
            "wall_time_s": wall_time,
            "history": history,
        }
        _atomic_torch_save(state, output_dir / "last.pt")
        _write_metrics(output_dir, history)
        try:
            _plot_curves(output_dir, history)
        except Exception as exc:  # noqa: BLE001 - a plotting problem must never kill a long run
            print(f"warning: could not plot curves: {exc}", flush=True)
        print(
            f"epoch {epoch + 1}/{args.epochs} lr={row['lr']:.5f} train_loss={row['train_loss']:.4f} train_acc={row['train_accuracy']:.4f} "
            f"val_loss={val_loss:.4f} val_acc={row['val_accuracy']:.4f} val_macro_f1={row['val_macro_f1']:.4f} "
            f"time={epoch_time:.1f}s{' *best*' if improved else ''}",
            flush=True,
        )
        if on_epoch_end is not None:
            on_epoch_end(row)
        epochs_run += 1
        if args.stop_after and epochs_run >= args.stop_after:
            return {"interrupted": True, "epoch": epoch + 1}
    summary = {
        "best_epoch": best_epoch,
        f"best_val_{args.select_metric}": best_score,
        "epochs_run": len(history),
        "stopped_early": stopped_early,
        "wall_time_s": round(wall_time, 1),
        "best_checkpoint": str(output_dir / "best.pt"),
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary), flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    return execute(get_args_parser().parse_args(argv), argv)


def execute(
    args: argparse.Namespace, argv: list[str] | None, make_objective: Callable[[argparse.Namespace], TrainingObjective] | None = None
) -> int:
    """Check the arguments, apply the torch thread/determinism settings for the run, and train."""
    if args.input_size > args.resize_to:
        print(f"error: --input-size {args.input_size} exceeds --resize-to {args.resize_to}", file=sys.stderr)
        return 2
    # Process-wide torch settings are restored on return: main() is also called in-process (CLI, tests).
    previous = (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    torch.set_num_threads(args.threads if args.threads > 0 else (os.cpu_count() or 1))
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return run_training(args, argv, make_objective)
    finally:
        torch.set_num_threads(previous[0])
        torch.use_deterministic_algorithms(previous[1], warn_only=previous[2])


def load_data(args: argparse.Namespace) -> tuple[ImageDataset, ImageDataset, dict[str, str]]:
    """The train and val splits the arguments select, and the selection itself (see :func:`data_selection`)."""
    selection = data_selection(args)
    train_set, val_set = (
        load_split_from_args(args, args.data_path, selection[split], args.resize_to).dataset for split in ("train_split", "val_split")
    )
    return train_set, val_set, selection


def run_training(
    args: argparse.Namespace, argv: list[str] | None, make_objective: Callable[[argparse.Namespace], TrainingObjective] | None = None
) -> int:
    """Load the data, record the arguments, train. ``make_objective`` (default: cross-entropy) is how ``ferstream distill`` differs."""
    name = args.name or args.arch
    output_dir = Path(args.output_dir).expanduser() if args.output_dir else default_runs_dir() / name
    output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        train_set, val_set, selection = load_data(args)
        objective = make_objective(args) if make_objective else CrossEntropyObjective()
    except (DatasetError, CheckpointError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if train_set.classes != FER_CLASSES:
        print(f"note: training on classes {train_set.classes}", flush=True)
    counts = dict(zip(train_set.classes, train_set.class_counts().tolist(), strict=True))
    print(
        f"loaded {selection['data_format']} data in {time.perf_counter() - started:.1f}s: "
        f"train {selection['train_split']} class counts {counts}, val {selection['val_split']} n={len(val_set)}",
        flush=True,
    )
    (output_dir / "args.json").write_text(
        json.dumps({**vars(args), "data_selection": selection, "argv": sys.argv if argv is None else argv}, indent=2, default=str) + "\n"
    )
    try:
        train(args, train_set, val_set, output_dir, objective)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
