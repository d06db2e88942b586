"""What a training run leaves in its folder: the resumable state (last.pt), metrics.csv/jsonl and curves.png."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CHECKPOINT_STATE_FORMAT",
    "METRIC_FIELDS",
    "RESUME_CHECKED_ARGS",
    "RESUME_CHECKED_DATA_ARGS",
    "atomic_torch_save",
    "plot_curves",
    "resolve_resume",
    "write_metrics",
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
