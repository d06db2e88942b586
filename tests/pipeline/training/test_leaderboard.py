"""A search's leaderboard, from trial folders on disk (the search itself runs in test_automl.py)."""

import csv
import json
from pathlib import Path

from pipeline.architectures import build_model
from pipeline.checkpoint import ModelMetadata, save_checkpoint
from pipeline.training.data import FER_CLASSES
from pipeline.training.leaderboard import leaderboard_rows, write_leaderboard


def _trial(root: Path, trial_id: str, accuracy: float | None) -> dict:
    folder = root / trial_id
    folder.mkdir(parents=True)
    if accuracy is not None:
        metrics = {"accuracy": accuracy, "macro_f1": accuracy / 2, "epoch": 3}
        meta = ModelMetadata(trial_id, "tiny", {}, FER_CLASSES, 44, 48, True, (0.5,), (0.3,), 0.0, metrics)
        save_checkpoint(folder / "best.pt", build_model("tiny", 7), meta)
    config = {"arch": "tiny", "lr": 0.01}
    return {"trial_id": trial_id, "trial_dir": str(folder), "status": "finished", "config": config, "epochs_run": 3, "wall_time_s": 1.5}


def test_rows_are_best_first_and_a_trial_without_a_checkpoint_comes_last(tmp_path: Path) -> None:
    trials = [_trial(tmp_path, "a", 0.4), _trial(tmp_path, "b", None), _trial(tmp_path, "c", 0.6)]
    rows = leaderboard_rows(trials, threads=1)
    assert [(row["rank"], row["trial"]) for row in rows] == [(1, "c"), (2, "a"), (3, "b")]
    assert rows[0]["val_accuracy"] == 0.6 and rows[0]["best_epoch"] == 3 and rows[0]["faces_per_s"] > 0
    assert rows[2]["checkpoint"] is None and rows[2]["val_accuracy"] is None

    report = write_leaderboard(tmp_path, rows, top_k=1, search={"preset": "test"})
    assert report["best_checkpoints"] == [str(tmp_path / "c" / "best.pt")]
    assert json.loads((tmp_path / "leaderboard.json").read_text())["search"] == {"preset": "test"}
    with open(tmp_path / "leaderboard.csv", newline="") as handle:
        written = list(csv.DictReader(handle))
    assert [row["trial"] for row in written] == ["c", "a", "b"] and json.loads(written[0]["config"]) == {"arch": "tiny", "lr": 0.01}
