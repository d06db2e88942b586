"""The `fer` package's side of ``benchmarks/fer_peer.py``: run by the peer venv's python, never imported.

It uses only the standard library, numpy and `fer` (nothing from this repository), so that it runs in
the throwaway venv that ``fer_peer.py`` builds. What it does is fer's documented use:
``FER(mtcnn=True)`` once, then ``detect_emotions(frame)`` one BGR frame at a time.

Input: each clip's frames, already decoded by ``fer_peer.py`` and saved as one ``(N, H, W, 3)``
uint8 ``.npy`` per clip (``--clip NAME=PATH``), loaded fully into memory before anything is timed,
so the peer's figure excludes decoding. After ``--warmup`` seconds of detection on the clips'
frames, whole passes over every clip run until ``--seconds`` have elapsed (at least one pass).
Output (``--out``, JSON): frames, wall time, frames/s, faces found per clip in each pass, and the
versions and threads used.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path
from typing import Any


def import_fer() -> Any:
    """fer's ``FER`` class, with its MTCNN's torch stack loaded first.

    fer imports TensorFlow at import; ``FER(mtcnn=True)`` then imports facenet-pytorch, whose
    torchvision loads triton (a dependency of torch's PyPI wheel), and triton's native library
    crashes the process (SIGSEGV in ``triton/knobs.py``) when it loads after TensorFlow's. Loading
    facenet-pytorch first avoids that and changes nothing of what fer runs.
    """
    import facenet_pytorch  # noqa: F401 - see above

    try:
        from fer import FER  # the README's import
    except ImportError:  # 25.10.3's fer/__init__.py does not export FER any more
        from fer.fer import FER
    return FER


def limit_threads(threads: int) -> dict[str, Any]:
    """TensorFlow's intra- and inter-op pools, OpenCV's and torch's (fer's MTCNN) to ``threads``.

    Must run before fer builds its models. fer's emotion model runs in a ``tf.lite.Interpreter``
    that fer creates with TFLite's default threads, which cannot be set from outside fer.
    """
    import cv2
    import tensorflow as tf
    import torch

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    cv2.setNumThreads(threads)
    torch.set_num_threads(threads)
    return {
        "tf_intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "tf_inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "cv2_threads": cv2.getNumThreads(),
        "torch_threads": torch.get_num_threads(),
    }


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version()}
    packages = ("fer", "tensorflow-cpu", "keras", "opencv-contrib-python", "numpy", "facenet-pytorch", "torch", "torchvision", "pillow")
    for package in packages:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            pass
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clip", action="append", required=True, help="NAME=PATH.npy, the clip's decoded BGR frames; repeatable")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds of detection before timing")
    parser.add_argument("--seconds", type=float, default=60.0, help="measure whole passes until this long has elapsed")
    parser.add_argument("--threads", type=int, default=2, help="TensorFlow intra/inter-op and OpenCV threads")
    parser.add_argument("--out", type=Path, required=True, help="write the result here as JSON")
    args = parser.parse_args()

    import numpy as np

    fer_class = import_fer()
    threads = limit_threads(args.threads)
    detector = fer_class(mtcnn=True)

    clips: dict[str, list[Any]] = {}
    for item in args.clip:
        name, _, path = item.partition("=")
        frames = np.load(path)  # fully in memory: no decoding or disk reads while timed
        clips[name] = [frames[index] for index in range(len(frames))]

    warmup_frames = 0
    started = time.perf_counter()
    while warmup_frames == 0 or time.perf_counter() - started < args.warmup:
        for frames in clips.values():
            detector.detect_emotions(frames[warmup_frames % len(frames)])
        warmup_frames += 1

    passes: list[dict[str, int]] = []
    seconds_per_clip = dict.fromkeys(clips, 0.0)
    usage_before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    while not passes or time.perf_counter() - started < args.seconds:
        faces_in_pass: dict[str, int] = {}
        for name, frames in clips.items():
            clip_started = time.perf_counter()
            faces_in_pass[name] = sum(len(detector.detect_emotions(frame)) for frame in frames)
            seconds_per_clip[name] += time.perf_counter() - clip_started
        passes.append(faces_in_pass)
    wall = time.perf_counter() - started
    usage_after = resource.getrusage(resource.RUSAGE_SELF)
    cpu_seconds = (usage_after.ru_utime - usage_before.ru_utime) + (usage_after.ru_stime - usage_before.ru_stime)

    frames_total = len(passes) * sum(len(frames) for frames in clips.values())
    result = {
        "side": "fer",
        "api": "FER(mtcnn=True).detect_emotions(frame), one frame at a time",
        "versions": versions(),
        "threads": threads,
        "cpu_affinity": sorted(os.sched_getaffinity(0)),
        "warmup_s": args.warmup,
        "warmup_frames_per_clip": warmup_frames,
        "passes": len(passes),
        "wall_s": round(wall, 3),
        "frames": frames_total,
        "frames_per_s": round(frames_total / wall, 3),
        "cpu_percent": round(100 * cpu_seconds / wall, 1),
        "clips": {
            name: {
                "frames_per_pass": len(frames),
                "faces_per_pass": [faces[name] for faces in passes],
                "faces": passes[0][name],
                "faces_per_frame": round(passes[0][name] / len(frames), 3),
                "frames_per_s": round(len(passes) * len(frames) / seconds_per_clip[name], 3),
            }
            for name, frames in clips.items()
        },
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
