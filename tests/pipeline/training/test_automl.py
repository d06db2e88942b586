"""`ferstream automl`: a real (local) Ray Tune search on the tiny image folders, and its parts."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline.checkpoint import load_checkpoint
from pipeline.training.automl import COMPACT_RECIPE, PRESETS, SearchPreset, _portfolio_points, apply_trial_config, main
from pipeline.training.train import get_args_parser

REPO = Path(__file__).resolve().parents[3]


def test_importing_automl_does_not_import_ray() -> None:
    code = "import sys, pipeline.training.automl; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[3])
    assert out.stdout.strip() == "False"


def test_every_preset_states_a_budget_and_trainable_archs() -> None:
    assert set(PRESETS) == {"low_resource", "default", "balanced", "high_quality"}
    budgets = [PRESETS[name].time_budget_s for name in ("low_resource", "default", "balanced", "high_quality")]
    assert budgets == sorted(budgets) and len(set(budgets)) == 4
    assert "resnet18" in PRESETS["high_quality"].archs


def test_the_portfolio_recipe_is_the_shipped_models_command_line() -> None:
    # MODEL_CARD.md's compact-v2 command is `ferstream train`'s defaults plus these; the portfolio must not drift from it.
    shipped = get_args_parser().parse_args(["--data-path", "x", "--epochs", "60", "--label-smoothing", "0.1", "--random-erase", "0.25"])
    args = apply_trial_config(shipped, COMPACT_RECIPE, Path("/tmp/unused"), threads=2)
    for name in ("arch", "epochs", "lr", "wd", "label_smoothing", "rotation", "scale", "random_erase", "mixup_alpha", "cutmix_alpha"):
        assert getattr(args, name) == getattr(shipped, name), name
    assert args.dropout == 0.2  # compact's own default, which the shipped run kept


def test_portfolio_points_follow_the_run_options() -> None:
    low = PRESETS["low_resource"]
    assert _portfolio_points(low, "sgd") == [COMPACT_RECIPE | {"epochs": 40}]
    assert max(low.epochs) == 40  # ASHA's max_t: the recipe runs its whole schedule
    shorter = SearchPreset(**{**vars(low), "epochs": (1,)})
    assert _portfolio_points(shorter, "sgd") == [COMPACT_RECIPE | {"epochs": 1}]
    assert _portfolio_points(SearchPreset(**{**vars(low), "archs": ("tiny",)}), "sgd") == []
    assert _portfolio_points(low, "adamw") == []  # lr 0.05 is an SGD step size


def test_trial_config_maps_onto_train_arguments(tmp_path: Path) -> None:
    base = get_args_parser().parse_args(["--data-path", "x", "--batch-size", "32"])
    config = {
        "arch": "tiny",
        "epochs": 3,
        "dropout": 0.1,
        "lr": 0.01,
        "wd": 1e-4,
        "label_smoothing": 0.1,
        "augment_strength": 0.5,
        "mix": "cutmix",
        "mix_alpha": 0.4,
        "seed": 7,
    }
    args = apply_trial_config(base, config, tmp_path / "t1", threads=2)
    assert (args.arch, args.epochs, args.lr, args.seed, args.batch_size) == ("tiny", 3, 0.01, 7, 32)
    assert (args.mixup_alpha, args.cutmix_alpha) == (0.0, 0.4)
    assert args.rotation == 10.0 and args.scale == (0.9, 1.1)
    assert args.resume == "auto" and args.output_dir == str(tmp_path / "t1")
    assert base.arch == "compact"  # the command line's namespace is not changed


def test_two_trials_one_epoch_write_a_leaderboard_and_loadable_checkpoints(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "search"
    argv = ["--archs", "tiny", "--epochs", "1", "--num-samples", "2", "--cpus-per-trial", "1", "--time-limit", "300"]
    argv += ["--output-dir", str(out), "--data-path", str(tiny_data), "--batch-size", "16", "--no-cache"]
    assert main(argv) == 0

    report = json.loads((out / "leaderboard.json").read_text())
    rows = report["trials"]
    assert len(rows) == 2 and [row["rank"] for row in rows] == [1, 2]
    assert rows[0]["val_accuracy"] >= rows[1]["val_accuracy"]
    for row in rows:
        assert row["status"] == "finished" and row["epochs_run"] == 1 and row["best_epoch"] == 1
        assert 0.0 <= row["val_accuracy"] <= 1.0 and 0.0 <= row["val_macro_f1"] <= 1.0
        assert row["faces_per_s"] > 0 and row["wall_time_s"] > 0
        assert row["config"]["arch"] == "tiny" and row["config"]["epochs"] == 1
    assert report["best_checkpoints"] == [row["checkpoint"] for row in rows]
    with open(out / "leaderboard.csv", newline="") as handle:
        csv_rows = list(csv.DictReader(handle))
    assert [r["trial"] for r in csv_rows] == [r["trial"] for r in rows]
    assert json.loads(csv_rows[0]["config"]) == rows[0]["config"]

    model, metadata = load_checkpoint(Path(report["best_checkpoints"][0]))
    assert metadata.arch == "tiny" and metadata.metrics["accuracy"] == rows[0]["val_accuracy"]


@pytest.mark.parametrize(("flag", "value"), [("--cpus-per-trial", "0"), ("--time-limit", "-5")])
def test_bad_search_options_fail_before_ray_starts(flag: str, value: str, tiny_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([flag, value, "--data-path", str(tiny_data)]) == 2
    assert flag in capsys.readouterr().err


def test_a_search_stopped_by_ctrl_c_says_so_and_resume_finishes_it_from_its_checkpoints(tiny_data: Path, tmp_path: Path) -> None:
    # Ctrl-C (SIGINT) once the first trial has finished an epoch, while the second still waits for the CPUs (each
    # trial holds all of them), then the same command with --resume.
    out = tmp_path / "search"
    cpus = str(os.cpu_count() or 1)
    command = [sys.executable, "-m", "pipeline.training.automl", "--archs", "tiny", "--epochs", "12", "--num-samples", "2"]
    # No ASHA stop before the last epoch: which of the two trials reaches a rung first decides which one ASHA stops,
    # so with early stopping "both finish" would depend on timing.
    command += ["--grace-period", "12"]
    command += ["--cpus-per-trial", cpus, "--time-limit", "600", "--output-dir", str(out)]
    command += ["--data-path", str(tiny_data), "--batch-size", "16", "--no-cache"]
    first = subprocess.Popen(
        command,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # Ctrl-C's default even under a CI shell
    )
    deadline = time.monotonic() + 300
    while not trial_epochs(out) and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert trial_epochs(out), "no epoch finished"
    first.send_signal(signal.SIGINT)
    first_output, _ = first.communicate(timeout=180)
    assert first.returncode == 130, first_output[-3000:]
    assert "interrupted with 2 trial(s) unfinished" in first_output and "--resume" in first_output
    interrupted = json.loads((out / "leaderboard.json").read_text())
    assert interrupted["search"]["unfinished_trials"] == 2
    (started,) = interrupted["trials"]  # the trial that never started is not a row
    assert started["status"] == "stopped" and started["epochs_run"] < 12
    first_epochs = trial_epochs(out)
    assert list(first_epochs) == [started["trial"]]

    resumed = subprocess.run([*command, "--resume"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr  # the trainer's exact resume, not a fresh start
    report = json.loads((out / "leaderboard.json").read_text())
    assert report["search"]["unfinished_trials"] == 0
    assert [(row["status"], row["epochs_run"]) for row in report["trials"]] == [("finished", 12), ("finished", 12)]
    epochs = trial_epochs(out)
    assert all([epoch["epoch"] for epoch in rows] == list(range(1, 13)) for rows in epochs.values())
    # Epoch 1 of the interrupted trial was not trained again: its row, wall time included, is the first run's.
    assert epochs[started["trial"]][0] == first_epochs[started["trial"]][0]


def trial_epochs(search: Path) -> dict[str, list[dict[str, Any]]]:
    """Each trial's per-epoch rows (the trainer's metrics.jsonl), for the trials with one epoch done."""
    return {
        path.parent.name: [json.loads(line) for line in path.read_text().splitlines()]
        for path in search.glob("trials/*/metrics.jsonl")
        if path.read_text().strip()
    }
