import json
import math

import pytest
import torch

from pipeline.checkpoint import load_checkpoint
from pipeline.training.train import main
from tests.pipeline.training.conftest import pattern_csv

FAST = ["--arch", "tiny", "--batch-size", "16", "--threads", "1", "--no-progress", "--lr-warmup-epochs", "0"]


def run(data, out, *extra: str) -> int:
    return main(["--data-path", str(data), "--output-dir", str(out), *FAST, *extra])


def history(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_epoch_smoke_run_learns_and_writes_artifacts(tiny_data, tmp_path):
    out = tmp_path / "run"
    assert run(tiny_data, out, "--epochs", "2", "--opt", "adamw", "--lr", "0.01", "--wd", "0.0") == 0
    rows = history(out)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert rows[1]["train_loss"] < rows[0]["train_loss"]
    assert min(r["val_loss"] for r in rows) < math.log(7), "better than chance on an easy dataset"
    for name in ("metrics.csv", "metrics.jsonl", "curves.png", "best.pt", "last.pt", "summary.json", "args.json"):
        assert (out / name).is_file(), name
    model, meta = load_checkpoint(out / "best.pt")
    best = max(rows, key=lambda r: r["val_accuracy"])
    assert meta.metrics["accuracy"] == best["val_accuracy"] and meta.metrics["split"] == "val"
    assert (meta.metrics["data"], meta.metrics["data_format"], meta.metrics["data_split"]) == (str(tiny_data / "val"), "imagefolder", "val")
    assert meta.input_size == 44 and meta.resize_to == 48 and meta.arch == "tiny"
    assert sum(meta.metrics["per_class_recall"].values()) > 0


def test_resume_after_interruption_is_bit_identical(tiny_data, tmp_path):
    extra = ("--epochs", "3", "--random-erase", "0.5", "--mixup-alpha", "0.2", "--cutmix-alpha", "1.0", "--seed", "3")
    assert run(tiny_data, tmp_path / "a", *extra) == 0
    assert run(tiny_data, tmp_path / "b", *extra, "--stop-after", "1") == 0
    assert len(history(tmp_path / "b")) == 1
    assert run(tiny_data, tmp_path / "b", *extra, "--resume", "auto") == 0
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 2
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
    for index, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["optimizer"]["state"][index][name]))

    def strip(rows: list[dict]) -> list[dict]:
        return [{k: v for k, v in row.items() if not k.endswith("time_s")} for row in rows]

    assert strip(history(tmp_path / "a")) == strip(history(tmp_path / "b"))


def test_early_stopping(tiny_data, tmp_path):
    out = tmp_path / "run"
    # lr 0: nothing can improve after the first epoch, so patience 1 stops after epoch 2.
    assert run(tiny_data, out, "--epochs", "6", "--lr", "0", "--patience", "1") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs_run"] == 2 and summary["stopped_early"] and summary["best_epoch"] == 1


@pytest.mark.parametrize(
    "options",
    [
        ("--class-balance", "sampler", "--lr-scheduler", "plateau", "--lr-warmup-epochs", "0.5", "--select-metric", "macro_f1"),
        ("--class-balance", "weighted-loss", "--opt", "adamw", "--lr", "0.003", "--label-smoothing", "0.1", "--color-jitter", "0.2"),
    ],
)
def test_recipe_options_run(tiny_data, tmp_path, options):
    assert run(tiny_data, tmp_path / "run", "--epochs", "1", "--memory-format", "contiguous", *options) == 0
    assert len(history(tmp_path / "run")) == 1


def test_trains_on_fer2013_csv_and_records_the_selection(tmp_path, capsys):
    csv_path = pattern_csv(tmp_path / "fer2013.csv", {"Training": 3, "PublicTest": 2, "PrivateTest": 1})
    out = tmp_path / "run"
    assert run(csv_path, out, "--epochs", "1", "--val-usage", "PrivateTest") == 0
    recorded = json.loads((out / "args.json").read_text())
    assert (recorded["data_format"], recorded["val_usage"], recorded["skip_classes"]) == ("auto", "PrivateTest", [])
    assert recorded["data_selection"] == {
        "data_format": "fer2013-csv",
        "train_split": "Training",
        "val_split": "PrivateTest",
        "val_data": str(csv_path),
    }
    _, meta = load_checkpoint(out / "best.pt")
    assert (meta.metrics["train_n"], meta.metrics["n"], meta.metrics["data_split"]) == (21, 7, "PrivateTest")
    capsys.readouterr()
    assert run(tmp_path / "run", tmp_path / "bad", "--data-format", "rafdb") == 2
    assert "list_patition_label.txt does not exist" in capsys.readouterr().err


def test_epoch_hook_sees_every_row_once_its_last_pt_is_written(tiny_data, tmp_path):
    from pipeline.training.train import get_args_parser, load_data, train

    out = tmp_path / "run"
    out.mkdir()
    args = get_args_parser().parse_args(["--data-path", str(tiny_data), "--arch", "tiny", "--epochs", "2", "--batch-size", "16"])
    args.no_progress = True
    train_set, val_set, _ = load_data(args)
    seen: list[tuple[int, int]] = []

    def hook(row: dict) -> None:
        state = torch.load(out / "last.pt", weights_only=False)
        seen.append((row["epoch"], state["epoch"] + 1))

    train(args, train_set, val_set, out, on_epoch_end=hook)
    assert seen == [(1, 1), (2, 2)]
    assert [row["epoch"] for row in history(out)] == [1, 2]


def test_a_time_budget_shortens_the_schedule_to_the_epochs_that_fit(tiny_data, tmp_path):
    out = tmp_path / "budget"
    assert run(tiny_data, out, "--epochs", "400", "--time-budget", "3", "--lr", "0.05") == 0
    rows = history(out)
    summary = json.loads((out / "summary.json").read_text())
    planned = summary["planned_epochs"]
    assert 1 <= planned < 400 and len(rows) == planned == rows[-1]["planned_epochs"]
    assert sum(r["epoch_time_s"] for r in rows) < 3 + 2 * max(r["epoch_time_s"] for r in rows)
    state = torch.load(out / "last.pt", weights_only=False)
    # the cosine schedule was re-aimed at the planned end (tiny_data: 5 steps per epoch), and a resume continues it
    assert state["planned_epochs"] == planned and state["scheduler"]["lr_lambdas"][0]["total_steps"] == planned * 5
    assert run(tiny_data, out, "--epochs", "400", "--resume", "auto") == 0
    assert len(history(out)) == planned  # no budget this time: the saved plan stands
