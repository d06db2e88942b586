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
import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pipeline.architectures import ARCHITECTURES, build_model, count_parameters
from pipeline.checkpoint import CheckpointError, ModelMetadata, load_checkpoint, preprocess_crops, save_checkpoint
from pipeline.training.augment import TensorAugment
from pipeline.training.data import FER_CLASSES, DatasetError, ImageDataset
from pipeline.training.loop import (
    CrossEntropyObjective,
    TrainingLoop,
    TrainingObjective,
    class_weights_for,
    epochs_within_budget,
    evaluate,
    make_optimizer,
    make_scheduler,
)
from pipeline.training.run_files import RunProgress, resolve_resume, restore_state, save_state, write_run_files
from pipeline.training.splits import SPLITS, add_dataset_arguments, load_split_from_args, resolve_format

__all__ = [
    "data_selection",
    "execute",
    "get_args_parser",
    "load_data",
    "main",
    "run_training",
    "train",
]


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
    parser.add_argument(
        "--time-budget",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="fit the run into this many seconds of training: after each epoch the cosine schedule is shortened to the "
        "epochs that still fit (at the recent epoch time), at most --epochs; 0 = no budget. A resume gets the budget anew",
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


def _initial_weights(path: str, arch: str, classes: tuple[str, ...]) -> dict[str, Tensor]:
    model, metadata = load_checkpoint(Path(path).expanduser())
    if metadata.arch != arch or metadata.classes != classes:
        raise CheckpointError(
            f"--init-from {path}: it is a {metadata.arch!r} model over {list(metadata.classes)}, "
            f"the run trains {arch!r} over {list(classes)}"
        )
    return model.state_dict()


def _build_loop(
    args: argparse.Namespace, train_set: ImageDataset, metadata: ModelMetadata, objective: TrainingObjective, device: torch.device
) -> TrainingLoop:
    """The model, optimizer, schedule and augmentation of a fresh run (a resume then loads their state)."""
    num_classes = len(train_set.classes)
    torch.manual_seed(args.seed)
    model = build_model(args.arch, num_classes, **metadata.arch_kwargs).to(device)
    init_from = getattr(args, "init_from", None)
    if init_from:
        model.load_state_dict(_initial_weights(init_from, args.arch, tuple(train_set.classes)))
    memory_format = torch.channels_last if args.memory_format == "channels_last" else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = make_optimizer(args, model)
    n_train = len(train_set) if args.train_limit <= 0 else min(args.train_limit, len(train_set))
    batch_size = min(args.batch_size, n_train)
    # drop_last: a 1-sample tail batch would make BatchNorm statistics meaningless.
    steps_per_epoch = max(1, n_train // batch_size)
    augment = TensorAugment(
        args.input_size,
        args.resize_to,
        metadata.mean[0],
        metadata.std[0],
        scale=tuple(args.scale),
        translate_px=args.translate,
        rotation_deg=args.rotation,
        hflip=args.hflip,
        color_jitter=args.color_jitter,
        random_erase=args.random_erase,
    )
    objective.bind(metadata, device, memory_format)
    return TrainingLoop(
        args=args,
        model=model,
        optimizer=optimizer,
        scheduler=make_scheduler(args, optimizer, steps_per_epoch),
        scaler=torch.amp.GradScaler("cuda") if args.amp and device.type == "cuda" else None,
        objective=objective,
        augment=augment,
        train_images=torch.from_numpy(train_set.images),
        train_labels=torch.from_numpy(train_set.labels),
        n_train=n_train,
        batch_size=batch_size,
        steps_per_epoch=steps_per_epoch,
        warmup_steps=max(0, int(round(args.lr_warmup_epochs * steps_per_epoch))),
        num_classes=num_classes,
        class_weights=class_weights_for(train_set.labels, num_classes).to(device) if args.class_balance == "weighted-loss" else None,
        device=device,
        memory_format=memory_format,
    )


def _best_metrics(
    args: argparse.Namespace,
    epoch: int,
    val_loss: float,
    val_metrics: dict[str, Any],
    train_set: ImageDataset,
    val_set: ImageDataset,
    model: nn.Module,
    objective: TrainingObjective,
) -> dict[str, Any]:
    """What a best.pt records about itself: the epoch, the val split and its metrics."""
    selection = data_selection(args)
    return {
        "epoch": epoch,
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
    name = args.name or args.arch
    base_metadata = ModelMetadata(
        model_id=name,
        arch=args.arch,
        arch_kwargs={} if args.dropout is None else {"dropout": args.dropout},
        classes=tuple(train_set.classes),
        input_size=args.input_size,
        resize_to=args.resize_to,
        grayscale=True,
        # Mean/std from the training images (pixel statistics), rounded so the metadata stays readable.
        mean=(round(float(train_set.images.mean()) / 255.0, 4),),
        std=(round(float(train_set.images.std()) / 255.0, 4),),
        face_margin=args.face_margin,
        metrics={},
    )
    objective = objective or CrossEntropyObjective()
    loop = _build_loop(args, train_set, base_metadata, objective, device)
    model, optimizer, scheduler = loop.model, loop.optimizer, loop.scheduler
    # The val tensor is built once, through the serving transform.
    val_inputs = preprocess_crops(list(val_set.images), base_metadata)
    val_labels = torch.from_numpy(val_set.labels)

    resume_path = resolve_resume(args, output_dir)
    progress = restore_state(resume_path, args, loop, get_args_parser()) if resume_path is not None else RunProgress()
    print(
        f"arch={args.arch} params={count_parameters(model):,} train={len(train_set)} val={len(val_set)} "
        f"steps/epoch={loop.steps_per_epoch} device={device} threads={torch.get_num_threads()} output={output_dir}",
        flush=True,
    )
    stopped_early = False
    epochs_run = 0
    deadline = time.monotonic() + args.time_budget if args.time_budget > 0 else None
    planned_epochs = progress.planned_epochs or args.epochs
    iteration_times: list[float] = []  # whole epochs with their evaluation and files, as the budget sees them
    for epoch in range(progress.next_epoch, args.epochs):
        if args.patience > 0 and progress.bad_epochs >= args.patience:
            stopped_early = True
            break
        if epoch >= planned_epochs:
            break
        epoch_start = time.perf_counter()
        train_loss, train_accuracy = loop.train_one_epoch(epoch)
        val_loss, val_metrics = evaluate(model, val_inputs, val_labels, train_set.classes, device, loop.memory_format)
        score = val_metrics["accuracy"] if args.select_metric == "accuracy" else val_metrics["macro"]["f1"]
        if args.lr_scheduler == "plateau" and (epoch + 1) * loop.steps_per_epoch >= loop.warmup_steps:
            scheduler.step(score)
        improved = score > progress.best_score + args.min_delta
        epoch_time = time.perf_counter() - epoch_start
        progress.wall_time_s += epoch_time
        row = {
            "epoch": epoch + 1,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": train_loss,
            "train_accuracy": train_accuracy,
            "val_loss": val_loss,
            "val_accuracy": val_metrics["accuracy"],
            "val_macro_f1": val_metrics["macro"]["f1"],
            "epoch_time_s": round(epoch_time, 2),
            "wall_time_s": round(progress.wall_time_s, 2),
            "best": improved,
        }
        if deadline is not None:
            # Whole earlier epochs (with their files) where there are some, else this one so far.
            per_epoch = iteration_times or [time.perf_counter() - epoch_start]
            planned = epochs_within_budget(epoch + 1, args.epochs, per_epoch, deadline - time.monotonic())
            if planned != planned_epochs:
                print(f"time budget: {planned} epochs in all (was {planned_epochs})", flush=True)
                planned_epochs = progress.planned_epochs = planned
                loop.plan_epochs(planned)
        row["planned_epochs"] = planned_epochs
        progress.history.append(row)
        progress.next_epoch = epoch + 1
        if improved:
            progress.best_score, progress.best_epoch, progress.bad_epochs = score, epoch + 1, 0
            metrics = _best_metrics(args, epoch + 1, val_loss, val_metrics, train_set, val_set, model, objective)
            metadata = dataclasses.replace(base_metadata, model_id=f"{name}-e{epoch + 1:03d}", metrics=metrics)
            save_checkpoint(output_dir / "best.pt", model, metadata)
        else:
            progress.bad_epochs += 1
        save_state(output_dir / "last.pt", args, loop, progress)
        write_run_files(output_dir, progress.history)
        print(
            f"epoch {epoch + 1}/{planned_epochs} lr={row['lr']:.5f} train_loss={row['train_loss']:.4f} "
            f"train_acc={row['train_accuracy']:.4f} "
            f"val_loss={val_loss:.4f} val_acc={row['val_accuracy']:.4f} val_macro_f1={row['val_macro_f1']:.4f} "
            f"time={epoch_time:.1f}s{' *best*' if improved else ''}",
            flush=True,
        )
        if on_epoch_end is not None:
            on_epoch_end(row)
        iteration_times.append(time.perf_counter() - epoch_start)
        epochs_run += 1
        if args.stop_after and epochs_run >= args.stop_after:
            return {"interrupted": True, "epoch": epoch + 1}
    summary = {
        "best_epoch": progress.best_epoch,
        f"best_val_{args.select_metric}": progress.best_score,
        "epochs_run": len(progress.history),
        "stopped_early": stopped_early,
        "planned_epochs": planned_epochs,
        "wall_time_s": round(progress.wall_time_s, 1),
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
