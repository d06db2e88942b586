"""Batched inference throughput of an expression checkpoint on this machine (faces/second).

Usage: python benchmarks/classifier_throughput.py [--model CKPT] [--batch-sizes 64 256] [--threads N]
       [--channels-last] [--onnxruntime [--onnx FILE]] [--json]

Two numbers per batch size:
* ``model``: the network alone on a ready N x C x S x S tensor;
* ``end_to_end``: uint8 48x48 face crops -> ``preprocess_crops`` -> network -> softmax, i.e.
  what the service's classifier pays per batch (face detection excluded).
The median over repeated timed batches is reported, so a noisy neighbour on a shared CPU skews it less.

``--onnxruntime`` adds a row per batch size for the classifier's ``backend: onnxruntime``: the
checkpoint's ONNX export (``--onnx FILE``, else exported to a temporary file by ``ferstream
export``'s code, parity check included) run by ONNX Runtime on CPU with ``--threads`` intra-op
threads, the same crops and the same preprocessing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.checkpoint import ONNX_INPUT, ONNX_OUTPUT, default_checkpoint_path, load_checkpoint, preprocess_crops  # noqa: E402
from pipeline.runtimes.onnx_runtime import load_onnx  # noqa: E402


def machine_description() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def time_batches(fn: Any, warmup: int, min_seconds: float, min_repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_repeats or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def row(backend: str, batch_size: int, model_times: list[float], e2e_times: list[float]) -> dict[str, Any]:
    return {
        "backend": backend,
        "batch_size": batch_size,
        "model_faces_per_s": round(batch_size / statistics.median(model_times), 1),
        "end_to_end_faces_per_s": round(batch_size / statistics.median(e2e_times), 1),
        "model_ms_per_batch_median": round(1000 * statistics.median(model_times), 2),
        "repeats": len(model_times),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint (default: the shipped model)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--threads", type=int, default=0, help="torch and ONNX Runtime intra-op threads (0 = all cores)")
    parser.add_argument("--seconds", type=float, default=5.0, help="minimum timed seconds per measurement")
    parser.add_argument("--channels-last", action="store_true", help="run the network in channels_last memory format")
    parser.add_argument("--onnxruntime", action="store_true", help="also time the ONNX export under ONNX Runtime (CPU)")
    parser.add_argument("--onnx", default=None, help="with --onnxruntime: this ONNX export (default: export the checkpoint to a temp file)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    threads = args.threads if args.threads > 0 else (os.cpu_count() or 1)
    torch.set_num_threads(threads)
    path = Path(args.model) if args.model else default_checkpoint_path()
    model, metadata = load_checkpoint(path)
    session = None
    if args.onnxruntime:
        with tempfile.TemporaryDirectory() as tmp:
            onnx_path = Path(args.onnx) if args.onnx else Path(tmp) / "model.onnx"
            if not args.onnx:
                from pipeline.training.export import export

                export(path, "onnx", onnx_path)
            session, onnx_metadata = load_onnx(onnx_path, threads=threads)
        if onnx_metadata != metadata:
            raise SystemExit(f"{args.onnx} is not an export of {path} (its metadata differs)")
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    rng = np.random.default_rng(0)
    results: dict[str, Any] = {
        "model": str(path),
        "model_id": metadata.model_id,
        "arch": metadata.arch,
        "input": f"{metadata.channels}x{metadata.input_size}x{metadata.input_size}",
        "memory_format": "channels_last" if args.channels_last else "contiguous",
        "machine": machine_description(),
    }
    if session is not None:
        import onnxruntime

        results["onnx"] = args.onnx or "temporary export of the model"
        results["machine"]["onnxruntime"] = onnxruntime.__version__
        results["machine"]["onnxruntime_intra_op_threads"] = threads
    rows = []
    with torch.inference_mode():
        for batch_size in args.batch_sizes:
            crops = list(rng.integers(0, 256, (batch_size, metadata.resize_to, metadata.resize_to), dtype=np.uint8))
            inputs = preprocess_crops(crops, metadata).contiguous(memory_format=memory_format)
            model_times = time_batches(lambda inputs=inputs: model(inputs), 2, args.seconds, 5)
            e2e_times = time_batches(
                lambda crops=crops: torch.softmax(model(preprocess_crops(crops, metadata).contiguous(memory_format=memory_format)), 1),
                2,
                args.seconds,
                5,
            )
            rows.append(row("torch", batch_size, model_times, e2e_times))
            if session is not None:
                array = inputs.contiguous().numpy()
                model_times = time_batches(lambda array=array: session.run([ONNX_OUTPUT], {ONNX_INPUT: array}), 2, args.seconds, 5)
                e2e_times = time_batches(
                    lambda crops=crops: torch.softmax(
                        torch.from_numpy(session.run([ONNX_OUTPUT], {ONNX_INPUT: preprocess_crops(crops, metadata).numpy()})[0]), 1
                    ),
                    2,
                    args.seconds,
                    5,
                )
                rows.append(row("onnxruntime", batch_size, model_times, e2e_times))
    results["results"] = rows
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        machine = results["machine"]
        print(f"{results['model_id']} ({results['arch']}) on {machine['cpu']}, {machine['logical_cores']} cores, torch {machine['torch']}")
        print(
            f"input {results['input']} {results['memory_format']}, threads={machine['torch_threads']}, "
            f"load(1m) at start={machine['load_avg_1m_at_start']}"
        )
        for result in rows:
            print(
                f"{result['backend']:<11} batch {result['batch_size']:>4}: model {result['model_faces_per_s']:8.1f} faces/s"
                f"  end-to-end {result['end_to_end_faces_per_s']:8.1f} faces/s  ({result['model_ms_per_batch_median']} ms/batch)"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
