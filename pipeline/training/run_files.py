"""What a training run leaves in its folder: the resumable state (last.pt), metrics.csv/jsonl and curves.png."""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.training.loop import TrainingLoop

__all__ = [
    "CHECKPOINT_STATE_FORMAT",
    "METRIC_FIELDS",
    "RESUME_CHECKED_ARGS",
    "RESUME_CHECKED_DATA_ARGS",
    "RunProgress",
    "atomic_torch_save",
    "plot_curves",
    "resolve_resume",
    "restore_state",
    "save_state",
    "write_metrics",
    "write_run_files",
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
    "planned_epochs",
)

# Changed between a run and its resume, these get a warning. A state saved before an option existed holds its default.
RESUME_CHECKED_ARGS = ("arch", "epochs", "seed", "lr", "opt", "lr_scheduler", "batch_size", "input_size")
RESUME_CHECKED_DATA_ARGS = ("data_format", "ferplus_csv", "label_scheme", "skip_classes", "val_usage")


def atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def write_metrics(output_dir: Path, history: list[dict[str, Any]]) -> None:
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


def plot_curves(output_dir: Path, history: list[dict[str, Any]]) -> None:
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


def resolve_resume(args: argparse.Namespace, output_dir: Path) -> Path | None:
    if not args.resume:
        return None
    if args.resume == "auto":
        last = output_dir / "last.pt"
        return last if last.is_file() else None
    path = Path(args.resume).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--resume {path}: no such training-state file")
    return path


@dataclass
class RunProgress:
    """Where a run stands after an epoch: what last.pt keeps besides the model, optimizer and schedule."""

    next_epoch: int = 0
    best_score: float = -math.inf
    best_epoch: int = -1
    bad_epochs: int = 0
    wall_time_s: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    planned_epochs: int = 0  # where the schedule ends (--time-budget may shorten it); 0: --epochs


def save_state(path: Path, args: argparse.Namespace, loop: TrainingLoop, progress: RunProgress) -> None:
    state = {
        "format": CHECKPOINT_STATE_FORMAT,
        "args": vars(args),
        "epoch": progress.next_epoch - 1,
        "model": loop.model.state_dict(),
        "optimizer": loop.optimizer.state_dict(),
        "scheduler": loop.scheduler.state_dict(),
        "scaler": loop.scaler.state_dict() if loop.scaler is not None else None,
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        "best_score": progress.best_score,
        "best_epoch": progress.best_epoch,
        "bad_epochs": progress.bad_epochs,
        "wall_time_s": progress.wall_time_s,
        "history": progress.history,
        "planned_epochs": progress.planned_epochs,
    }
    atomic_torch_save(state, path)


def restore_state(path: Path, args: argparse.Namespace, loop: TrainingLoop, defaults: argparse.ArgumentParser) -> RunProgress:
    """Load last.pt into the loop's model, optimizer, schedule and the RNGs; warn where the arguments changed
    (``defaults`` gives the value of an option a state saved before that option existed)."""
    state = torch.load(path, map_location=loop.device, weights_only=False)
    if state.get("format") != CHECKPOINT_STATE_FORMAT:
        raise ValueError(f"{path} is not a training-state file ({CHECKPOINT_STATE_FORMAT})")
    for key in RESUME_CHECKED_ARGS + RESUME_CHECKED_DATA_ARGS:
        recorded = state["args"].get(key, defaults.get_default(key))
        if recorded != getattr(args, key):
            print(f"warning: resuming with --{key.replace('_', '-')} {getattr(args, key)!r}, the run used {recorded!r}", flush=True)
    loop.model.load_state_dict(state["model"])
    loop.optimizer.load_state_dict(state["optimizer"])
    loop.scheduler.load_state_dict(state["scheduler"])
    if loop.scaler is not None and state.get("scaler"):
        loop.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    np.random.set_state(state["rng"]["numpy"])
    random.setstate(state["rng"]["python"])
    progress = RunProgress(
        next_epoch=state["epoch"] + 1,
        best_score=state["best_score"],
        best_epoch=state["best_epoch"],
        bad_epochs=state["bad_epochs"],
        wall_time_s=state["wall_time_s"],
        history=state["history"],
        planned_epochs=state.get("planned_epochs", 0),
    )
    best = f"best {args.select_metric} {progress.best_score:.4f} at epoch {progress.best_epoch}"
    print(f"resumed from {path} at epoch {progress.next_epoch} ({best})", flush=True)
    return progress


def write_run_files(output_dir: Path, history: list[dict[str, Any]]) -> None:
    """metrics.csv/jsonl and curves.png from the history, rewritten whole after every epoch."""
    write_metrics(output_dir, history)
    try:
        plot_curves(output_dir, history)
    except Exception as exc:  # noqa: BLE001 - a plotting problem must never kill a long run
        print(f"warning: could not plot curves: {exc}", flush=True)
