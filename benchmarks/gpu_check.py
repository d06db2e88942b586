"""The prepared GPU check: detectors and classifier batched on the device, then the GPU pipeline config.

Usage (on a machine with an NVIDIA GPU, from the repository root, about 5 minutes):
    FERSTREAM_SHARED=../shared python benchmarks/gpu_check.py --out gpu-results
    scripts/gpu_check.sh                 # the same, with OUT (default gpu-results) and a hard time limit

``--device cpu --quick`` runs every step on the CPU in seconds; the tests do that, so the script cannot rot
before the first day a GPU machine is lent.

Steps, each timed and written to ``<out>/gpu_check.json`` (plus ``gpu_check.md``, a table):
1. the machine: torch, CUDA, the device's name and memory;
2. detectors alone on the shared clips' frames (Intel IoT DevKit sample videos, CC BY 4.0) downscaled to the
   GPU config's ``detection_size``, at batch 1, 4 and 16: BlazeFace rebuilt in PyTorch (``runtime: torch``, the
   GPU path; whole frame and with the default tiles) and MTCNN, frames/s and faces found per frame;
3. the expression classifier through ``ExpressionClassifier.predict`` (preprocessing included, float16 on CUDA)
   at batch 64, 256 and 1024: faces/s;
4. ``benchmarks/pipeline_throughput.py`` with ``configs/pipeline-gpu.yaml`` (single process, 4 cameras).
A step that fails is recorded with its error and the next one still runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bench_common as common
import numpy as np
import torch

from pipeline.config import BlazeFaceConfig, ClassifierConfig, MTCNNConfig, load_config
from pipeline.detection import FaceDetector, build_detector, downscale_for_detection

REPO_ROOT = Path(__file__).resolve().parents[1]
GPU_CONFIG = REPO_ROOT / "configs" / "pipeline-gpu.yaml"


def device_description(device: str) -> dict[str, Any]:
    facts: dict[str, Any] = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available(), "device": device}
    if device == "cuda":
        properties = torch.cuda.get_device_properties(0)
        facts.update(name=properties.name, memory_gib=round(properties.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return facts


def timed_rate(step: Callable[[], int], min_seconds: float, sync: Callable[[], None]) -> tuple[float, float]:
    """(calls per second, items per call) of ``step`` after one warm-up call; ``step`` returns the items it made."""
    step()
    sync()
    calls, items = 0, 0
    started = time.perf_counter()
    while True:
        items += step()
        calls += 1
        sync()
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds:
            return calls / elapsed, items / calls


def detector_rows(device: str, frames: list[np.ndarray], batches: list[int], seconds: float, sync: Callable[[], None]) -> list[dict]:
    detection_size = load_config(GPU_CONFIG).detector.detection_size
    small = [downscale_for_detection(frame, detection_size).image for frame in frames]
    configs: dict[str, MTCNNConfig | BlazeFaceConfig] = {
        "blazeface torch, whole frame": BlazeFaceConfig(runtime="torch", device=device, tiles=(1, 1), detection_size=detection_size),
        "blazeface torch, default tiles": BlazeFaceConfig(runtime="torch", device=device, detection_size=detection_size),
        "mtcnn": MTCNNConfig(device=device, detection_size=detection_size),
    }
    rows = []
    for name, config in configs.items():
        detector: FaceDetector = build_detector(config)
        for batch in batches:
            images = (small * (batch // len(small) + 1))[:batch]

            def step(detector: FaceDetector = detector, images: list[np.ndarray] = images) -> int:
                return sum(len(faces) for faces in detector.detect_batch(images))

            calls_per_s, faces_per_call = timed_rate(step, seconds, sync)
            rows.append(
                {
                    "detector": name,
                    "batch": batch,
                    "frames_per_s": round(calls_per_s * batch, 1),
                    "faces_per_frame": round(faces_per_call / batch, 2),
                }
            )
            print(f"detector {name} batch {batch}: {rows[-1]['frames_per_s']} frames/s", flush=True)
    return rows


def classifier_rows(device: str, batches: list[int], seconds: float, sync: Callable[[], None]) -> list[dict]:
    from pipeline.classification import ExpressionClassifier

    classifier = ExpressionClassifier(ClassifierConfig(device=device, half=True))
    rng = np.random.default_rng(0)
    rows = []
    for batch in batches:
        crops = list(rng.integers(0, 256, size=(batch, 48, 48, 3), dtype=np.uint8))

        def step(crops: list[np.ndarray] = crops) -> int:
            return len(classifier.predict(crops))

        calls_per_s, _ = timed_rate(step, seconds, sync)
        rows.append({"batch": batch, "faces_per_s": round(calls_per_s * batch, 1)})
        print(f"classifier batch {batch}: {rows[-1]['faces_per_s']} faces/s", flush=True)
    return rows


def pipeline_run(device: str, out: Path, seconds: float) -> dict[str, Any]:
    result_path = out / "pipeline_throughput.json"
    command = [sys.executable, str(REPO_ROOT / "benchmarks" / "pipeline_throughput.py"), "--cameras", "4"]
    command += ["--seconds", str(seconds), "--warmup", str(max(2.0, seconds / 3)), "--json", str(result_path)]
    if device == "cuda":
        command += ["--config", str(GPU_CONFIG)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=seconds * 4 + 180, check=False)
    (out / "pipeline_throughput.log").write_text(completed.stdout + completed.stderr)
    if completed.returncode != 0:
        raise RuntimeError(f"pipeline_throughput.py exited {completed.returncode}: {completed.stderr.strip().splitlines()[-1:]}")
    return json.loads(result_path.read_text())


def run_step(results: dict[str, Any], name: str, fn: Callable[[], Any]) -> None:
    started = time.perf_counter()
    try:
        results[name] = fn()
    except Exception as error:  # one failing step must not hide the others' results
        results[name] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
        print(f"{name} failed: {error}", flush=True)
    results.setdefault("step_seconds", {})[name] = round(time.perf_counter() - started, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu-results"), help="folder the results are written to")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: a smoke run of every step")
    parser.add_argument("--quick", action="store_true", help="short measurements (the CPU smoke run)")
    args = parser.parse_args()

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA device (use --device cpu for a smoke run)")
    args.out.mkdir(parents=True, exist_ok=True)
    seconds = 0.2 if args.quick else 5.0
    sync: Callable[[], None] = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    _info, frames = common.decode_clip(common.resolve_clip(common.DEFAULT_CLIP))
    frames = frames[:16]

    results: dict[str, Any] = {"when": common.utc_now(), "command": common.command_line(), "git": common.git_description()}
    results["machine"] = {**common.machine_description(), **device_description(args.device)}
    detector_batches = [1, 4] if args.quick else [1, 4, 16]
    classifier_batches = [64] if args.quick else [64, 256, 1024]
    run_step(results, "detectors", lambda: detector_rows(args.device, frames, detector_batches, seconds, sync))
    run_step(results, "classifier", lambda: classifier_rows(args.device, classifier_batches, seconds, sync))
    run_step(results, "pipeline", lambda: pipeline_run(args.device, args.out, 4.0 if args.quick else 30.0))

    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str))
    lines = [f"# GPU check, {results['when']}", "", f"Command: `{results['command']}`", ""]
    if isinstance(results["detectors"], list):
        header = ["detector", "batch", "frames/s", "faces/frame"]
        table = [[r["detector"], r["batch"], r["frames_per_s"], r["faces_per_frame"]] for r in results["detectors"]]
        lines += [common.markdown_table(header, table), ""]
    if isinstance(results["classifier"], list):
        lines += [common.markdown_table(["batch", "faces/s"], [[r["batch"], r["faces_per_s"]] for r in results["classifier"]]), ""]
    if isinstance(results["pipeline"], dict) and "summary" in results["pipeline"]:
        summary = results["pipeline"]["summary"]
        lines += [f"Pipeline, 4 cameras: {summary['frames_per_s']} frames/s, {summary['faces_per_s']} faces/s.", ""]
    (args.out / "gpu_check.md").write_text("\n".join(lines))
    failed = [name for name in ("detectors", "classifier", "pipeline") if isinstance(results[name], dict) and "error" in results[name]]
    print(f"results in {args.out}/gpu_check.json" + (f"; failed steps: {', '.join(failed)}" if failed else ""))
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
