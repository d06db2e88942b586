"""What a training run leaves in its folder."""

import argparse
import csv
import json
from pathlib import Path

import pytest

from pipeline.training.run_files import METRIC_FIELDS, resolve_resume, write_metrics


def test_resume_auto_without_last_pt_starts_fresh_and_a_missing_file_is_named(tmp_path: Path) -> None:
    assert resolve_resume(argparse.Namespace(resume=""), tmp_path) is None
    assert resolve_resume(argparse.Namespace(resume="auto"), tmp_path) is None
    (tmp_path / "last.pt").write_bytes(b"x")
    assert resolve_resume(argparse.Namespace(resume="auto"), tmp_path) == tmp_path / "last.pt"
    with pytest.raises(FileNotFoundError, match="--resume .*nope.pt: no such training-state file"):
        resolve_resume(argparse.Namespace(resume=str(tmp_path / "nope.pt")), tmp_path)


def test_metrics_files_are_rewritten_whole_from_the_history(tmp_path: Path) -> None:
    row = dict.fromkeys(METRIC_FIELDS, 0.5) | {"epoch": 1, "best": True}
    write_metrics(tmp_path, [row, row | {"epoch": 2}])
    write_metrics(tmp_path, [row])  # a resume from epoch 1 replaces, never appends
    with open(tmp_path / "metrics.csv", newline="") as handle:
        assert [r["epoch"] for r in csv.DictReader(handle)] == ["1"]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1]
    assert not list(tmp_path.glob("*.tmp"))
