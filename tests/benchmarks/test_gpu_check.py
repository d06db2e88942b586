"""The prepared GPU check must still run the day a GPU is lent: every step, on the CPU, in seconds."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_every_step_on_the_cpu(shared_dir, tmp_path):
    out = tmp_path / "results"
    environment = {**os.environ, "FERSTREAM_SHARED": str(shared_dir)}
    command = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick", "--out", str(out)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment, check=False)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    results = json.loads((out / "gpu_check.json").read_text())
    assert {row["detector"] for row in results["detectors"]} == {"blazeface torch, whole frame", "blazeface torch, default tiles", "mtcnn"}
    assert all(row["frames_per_s"] > 0 and row["faces_per_frame"] > 0 for row in results["detectors"])
    assert results["classifier"][0]["faces_per_s"] > 0
    assert results["pipeline"]["summary"]["frames"] > 0
    assert "| blazeface torch, default tiles |" in (out / "gpu_check.md").read_text()


def test_gpu_check_refuses_cuda_without_a_device(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    command = [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert completed.returncode == 1 and "no CUDA device" in completed.stderr
