"""A search's leaderboard: every trial's best checkpoint with its val metrics and CPU speed, best first."""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["LEADERBOARD_FIELDS", "leaderboard_rows", "measure_faces_per_s", "write_leaderboard"]

LEADERBOARD_FIELDS = (
    "rank",
    "trial",
    "status",
    "arch",
    "val_accuracy",
    "val_macro_f1",
    "best_epoch",
    "epochs_run",
    "wall_time_s",
    "faces_per_s",
    "checkpoint",
    "config",
)


def measure_faces_per_s(checkpoint: Path, batch: int = 64, repeats: int = 3, threads: int = 1) -> float:
    """Faces per second of a checkpoint's model on one fixed batch (CPU, ``threads`` torch threads)."""
    from pipeline.checkpoint import load_checkpoint

    model, metadata = load_checkpoint(checkpoint)
    model.eval()
    inputs = torch.zeros(batch, 1, metadata.input_size, metadata.input_size)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            model(inputs)  # warm-up: first-call allocation and kernel selection
            started = time.perf_counter()
            for _ in range(repeats):
                model(inputs)
            elapsed = time.perf_counter() - started
    finally:
        torch.set_num_threads(previous)
    return batch * repeats / elapsed


def leaderboard_rows(trials: Sequence[dict[str, Any]], threads: int) -> list[dict[str, Any]]:
    """Rows best first; a trial's figures are those of its best.pt (its best epoch by val top-1)."""
    from pipeline.checkpoint import load_checkpoint

    rows = []
    for trial in trials:
        checkpoint = Path(trial["trial_dir"]) / "best.pt"
        row: dict[str, Any] = {
            "trial": trial["trial_id"],
            "status": trial["status"],
            "arch": trial["config"].get("arch"),
            "val_accuracy": None,
            "val_macro_f1": None,
            "best_epoch": None,
            "epochs_run": trial["epochs_run"],
            "wall_time_s": trial["wall_time_s"],
            "faces_per_s": None,
            "checkpoint": None,
            "config": trial["config"],
        }
        if checkpoint.is_file():
            _, metadata = load_checkpoint(checkpoint)
            row.update(
                val_accuracy=metadata.metrics["accuracy"],
                val_macro_f1=metadata.metrics["macro_f1"],
                best_epoch=metadata.metrics["epoch"],
                faces_per_s=round(measure_faces_per_s(checkpoint, threads=threads), 1),
                checkpoint=str(checkpoint),
            )
        rows.append(row)
    rows.sort(key=lambda r: (r["val_accuracy"] is None, -(r["val_accuracy"] or 0.0), -(r["val_macro_f1"] or 0.0)))
    for rank, row in enumerate(rows, start=1):
        row["rank"] = rank
    return rows


def write_leaderboard(output_dir: Path, rows: list[dict[str, Any]], top_k: int, search: dict[str, Any]) -> dict[str, Any]:
    best = [row["checkpoint"] for row in rows if row["checkpoint"]][:top_k]
    with open(output_dir / "leaderboard.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=LEADERBOARD_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "config": json.dumps(row["config"], sort_keys=True)})
    report = {"search": search, "best_checkpoints": best, "trials": rows}
    (output_dir / "leaderboard.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report
