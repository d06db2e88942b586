"""ferstream against the `fer` package, side by side in one run, on the same clips and cores.

Usage:
    python benchmarks/fer_peer.py [--resolution native|1080p ...] [--seconds 60] [--warmup 10] [--repeats 2]
        [--config configs/pipeline.yaml] [--threads 2] [--cpus 0,1] [--frames N] [--venv DIR] [--json OUT]

The real measurement (on a quiet machine; from the repository root, ``.venv`` active, the shared
clips in ``../shared/media`` or ``$FERSTREAM_SHARED/media``)::

    FERSTREAM_SHARED=../shared python benchmarks/fer_peer.py --resolution native 1080p --json benchmarks/results/fer_peer.json
    FERSTREAM_SHARED=../shared python benchmarks/fer_peer.py --resolution native 1080p \\
        --config configs/pipeline-mtcnn.yaml --json benchmarks/results/fer_peer_mtcnn.json

A short run that only proves the script works end to end (numbers not to be quoted)::

    FERSTREAM_SHARED=../shared python benchmarks/fer_peer.py --resolution native 1080p --frames 3 --seconds 1 --warmup 0 --repeats 1

**The peer.** The `fer` package (25.10.3) is installed into its own throwaway venv outside the
repository (``--venv``, default ``~/.cache/ferstream/peer-venv``; built on first use, 7.5 min on a busy 2-core machine, and
reused while its requirements are unchanged): ``tensorflow-cpu``, ``opencv-contrib-python<5``,
``setuptools<81`` and ``fer==25.10.3 --no-deps``, plus what ``FER(mtcnn=True)`` imports that
``--no-deps`` leaves out, found by trying and pinned (``PEER_REQUIREMENTS``, ``PEER_NO_DEPS``):
``facenet-pytorch==2.6.0`` (fer's MTCNN; ``--no-deps``, it pins torch<2.3 and numpy<2),
``torch==2.14.1`` and ``torchvision==0.29.1`` (the releases ferstream's venv runs), ``pillow==13.0.0``,
``tqdm==4.67.1``. The worker (``benchmarks/fer_peer_worker.py``, run by the venv's python) calls
fer's documented ``FER(mtcnn=True)`` and ``detect_emotions(frame)``, one frame at a time, on each
clip's frames decoded beforehand (decoding is not timed for the peer), after ``--warmup`` seconds.
Two things a user of fer 25.10.3 meets too: the README's ``from fer import FER`` fails (its
``__init__`` no longer exports it; the worker falls back to ``fer.fer.FER``), and ``FER(mtcnn=True)``
crashes with SIGSEGV when triton (from torch's wheel) loads after TensorFlow, so the worker imports
facenet-pytorch before fer.

**ferstream.** The single-process ``StreamPipeline`` of ``ferstream run`` with ``--config``
(default ``configs/pipeline.yaml``; its cameras are replaced, events go to a redis-server this
script starts), the clips as cameras, every frame, no pacing: ``realtime: false``, ``target_fps:
null`` (``benchmarks/pipeline_throughput.py``'s functions). Decoding is part of its figure, on each
camera's own thread, as in the service. First one pass of every clip with ``loop: false`` counts
the faces found (and checks every frame was processed); then the clips loop as cameras for
``--warmup`` seconds and a measured window of ``--seconds``.

**Order.** For each resolution: peer, ferstream, peer, ferstream (``--repeats`` of each,
alternating); the table shows the best frames/s of each side and their ratio (ferstream / peer).
Faces found are per clip, one pass over its frames (fer is deterministic per frame, so every pass
of the peer finds the same; the JSON has every pass).

**Clips.** The shared clips (Intel IoT DevKit sample videos, CC BY 4.0), 480x270 at 12.5 fps.
``--resolution 1080p`` re-encodes them upscaled to 1920x1080 with PyAV (libx264, CRF 18, bicubic)
into a temporary directory at benchmark time; both sides then read those files. ``--frames N``
keeps each clip's first N frames (re-encoded too), for short runs.

**Threads and cores.** Both sides run on the same CPUs (``--cpus``, default all this process may
use; set with ``sched_setaffinity`` on this process, which the peer's process inherits) and one
side at a time. ferstream: ``torch.set_num_threads(--threads)`` for detection and classification,
plus one PyAV decode thread per camera (FFmpeg's decoder defaults). The peer: TensorFlow
intra-op and inter-op threads = ``--threads``, ``cv2.setNumThreads(--threads)`` and, since fer's
MTCNN runs on torch, ``torch.set_num_threads(--threads)``; fer's emotion model runs in a TFLite
interpreter that fer builds with TFLite's default threads (not settable from outside fer). The default 2 is this machine's cores.
The JSON records what each side reported using, and every other process's CPU during each run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bench_common as common
import numpy as np
import torch
from bench_common import REPO_ROOT
from pipeline_throughput import (
    add_setting_argument,
    build_config,
    build_pipeline,
    camera_counts,
    measure_window,
    snapshot,
    summarize,
    unpaced_source,
)

from pipeline.config import PipelineConfig

# What the issue asks for, then what `FER(mtcnn=True)` imports that `fer --no-deps` leaves out (found by
# trying, pinned): its MTCNN is facenet-pytorch's (torch, torchvision, tqdm), its image helpers need Pillow.
# torch/torchvision are the releases ferstream's own venv runs, so both sides run the same torch. One pip
# call for all of them, so that `setuptools<81` (fer imports pkg_resources) holds against torch's setuptools.
PEER_REQUIREMENTS = (
    "tensorflow-cpu",
    "opencv-contrib-python<5",
    "setuptools<81",
    "torch==2.14.1",
    "torchvision==0.29.1",
    "pillow==13.0.0",
    "tqdm==4.67.1",
)
# Installed --no-deps: fer declares tensorflow (not -cpu), moviepy, pandas and more that FER does not import,
# and facenet-pytorch 2.6.0 pins torch<2.3 and numpy<2; both run with the releases above.
PEER_NO_DEPS = ("fer==25.10.3", "facenet-pytorch==2.6.0")
PEER_WORKER = Path(__file__).with_name("fer_peer_worker.py")
DEFAULT_VENV = Path("~/.cache/ferstream/peer-venv")
STAMP_NAME = "ferstream-peer-requirements.txt"

# -- the peer's venv ------------------------------------------------------------------------------


def peer_install_plan() -> list[list[str]]:
    """The ``pip install`` argument lists, in order, that build the peer's venv."""
    return [["install", *PEER_REQUIREMENTS], ["install", "--no-deps", *PEER_NO_DEPS]]


def ensure_peer_venv(venv: Path) -> Path:
    """The venv's python, after building the venv if it is missing or its requirements changed."""
    venv = venv.expanduser().resolve()
    if venv.is_relative_to(REPO_ROOT):
        raise SystemExit(f"--venv {venv} is inside the repository; the peer's venv must live outside it")
    python = venv / "bin" / "python"
    stamp = venv / STAMP_NAME
    wanted = "\n".join(" ".join(step) for step in peer_install_plan()) + "\n"
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    print(f"building the peer's venv in {venv} (once; minutes) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    for step in peer_install_plan():
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *step[1:]], check=True)
    check = subprocess.run([str(python), "-c", "import facenet_pytorch, fer.fer"], capture_output=True, text=True)
    if check.returncode != 0:
        raise SystemExit(f"the peer's venv cannot import fer:\n{check.stderr[-3000:]}")
    stamp.write_text(wanted)
    return python


# -- clips ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreparedClip:
    name: str
    path: Path  # what ferstream opens as a camera
    frames_npy: Path  # the same frames, decoded, for the peer
    info: common.ClipInfo


def prepare_clips(clips: dict[str, Path], work: Path, size: tuple[int, int] | None, max_frames: int | None) -> list[PreparedClip]:
    """The clips as both sides will see them: re-encoded if scaled or cut, and decoded once for the peer."""
    prepared = []
    for name, source in clips.items():
        path = source
        if size is not None or max_frames is not None:
            suffix = f"{size[0]}x{size[1]}" if size else "native"
            path = common.reencode_clip(source, work / f"{name}-{suffix}.mp4", size, max_frames)
        info, images = common.decode_clip(path)
        frames_npy = work / f"{path.stem}.npy"
        np.save(frames_npy, np.stack(images))
        prepared.append(PreparedClip(name, path, frames_npy, info))
    return prepared


def clip_set_label(clips: list[PreparedClip]) -> str:
    sizes = sorted({f"{clip.info.width}x{clip.info.height}" for clip in clips})
    return f"{len(clips)} shared clips, {'/'.join(sizes)}, {sum(clip.info.frames for clip in clips)} frames"


# -- the two sides --------------------------------------------------------------------------------


def run_peer(
    python: Path, clips: list[PreparedClip], warmup: float, seconds: float, threads: int, work: Path, exclude: set[int]
) -> dict[str, Any]:
    out = work / "peer-result.json"
    out.unlink(missing_ok=True)
    command = [str(python), str(PEER_WORKER), "--warmup", str(warmup), "--seconds", str(seconds), "--threads", str(threads)]
    command += [arg for clip in clips for arg in ("--clip", f"{clip.name}={clip.frames_npy}")]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": str(threads)}
    env.pop("PYTHONPATH", None)  # nothing of this repository or its venv leaks into the peer's
    ticks_before = common.cpu_snapshot()
    started = time.perf_counter()
    process = subprocess.Popen([*command, "--out", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output, _ = process.communicate()
    elapsed = time.perf_counter() - started
    ticks_after = common.cpu_snapshot()
    if process.returncode != 0 or not out.exists():
        raise SystemExit(f"the peer worker failed (exit {process.returncode}):\n{output[-4000:]}")
    result = json.loads(out.read_text())
    result["process_s"] = round(elapsed, 1)
    result["other_processes_cpu"] = common.other_processes_cpu(ticks_before, ticks_after, elapsed, {process.pid, *exclude})
    return result


def run_ferstream(config: PipelineConfig, clips: list[PreparedClip], warmup: float, seconds: float, exclude: set[int]) -> dict[str, Any]:
    pipeline, metrics = build_pipeline(config)
    try:
        # One pass of every clip, every frame: the faces found, comparable with the peer's pass.
        counting_ids = [f"count{index}" for index in range(len(clips))]
        start = snapshot(metrics, counting_ids)
        for camera_id, clip in zip(counting_ids, clips, strict=True):
            pipeline.add_camera(unpaced_source(camera_id, clip.path, loop=False))
        pipeline.run()
        one_pass = camera_counts(start, snapshot(metrics, counting_ids))
        for camera_id in counting_ids:
            pipeline.remove_camera(camera_id)

        # Throughput: the clips looping as cameras, warm-up, then the measured window.
        camera_ids = [f"cam{index}" for index in range(len(clips))]
        for camera_id, clip in zip(camera_ids, clips, strict=True):
            pipeline.add_camera(unpaced_source(camera_id, clip.path))
        window = measure_window(pipeline, metrics, camera_ids, warmup, seconds)
    finally:
        pipeline.close()
    summary = summarize(window.start, window.end)
    return {
        "side": "ferstream",
        "threads": {"torch_threads": torch.get_num_threads(), "decode_threads": f"one PyAV thread per camera ({len(clips)})"},
        "cpu_affinity": sorted(os.sched_getaffinity(0)),
        "wall_s": summary["wall_s"],
        "frames": summary["frames"],
        "frames_per_s": summary["frames_per_s"],
        "cpu_percent": window.own_cpu_percent(),
        "summary": summary,
        "other_processes_cpu": common.other_processes_cpu(window.ticks_before, window.ticks_after, summary["wall_s"], exclude),
        "clips": {
            clip.name: {
                "frames_per_pass": clip.info.frames,
                "frames_processed_in_pass": one_pass[counting_id]["frames"],
                "faces": one_pass[counting_id]["faces"],
                "faces_per_frame": one_pass[counting_id]["faces_per_frame"],
                "window_faces_per_frame": summary["cameras"][camera_id]["faces_per_frame"],
            }
            for clip, counting_id, camera_id in zip(clips, counting_ids, camera_ids, strict=True)
        },
    }


# -- report ---------------------------------------------------------------------------------------


def best_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return max(runs, key=lambda run: run["frames_per_s"])


def compare(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The best run of each side, their frames/s ratio (ferstream / peer) and faces found per clip."""
    peer = best_run([run for run in runs if run["side"] == "fer"])
    ours = best_run([run for run in runs if run["side"] == "ferstream"])
    return {
        "peer_frames_per_s": peer["frames_per_s"],
        "ferstream_frames_per_s": ours["frames_per_s"],
        "ratio": round(ours["frames_per_s"] / peer["frames_per_s"], 3),
        "clips": {
            name: {
                "frames": peer["clips"][name]["frames_per_pass"],
                "ferstream_frames_processed": item["frames_processed_in_pass"],
                "peer_faces": peer["clips"][name]["faces"],
                "ferstream_faces": item["faces"],
            }
            for name, item in ours["clips"].items()
        },
    }


def report_markdown(sets: list[dict[str, Any]]) -> str:
    header = ["clip set", "side", "frames/s (best)", "all runs", "faces found (one pass)", "ratio ferstream / fer"]
    rows = []
    for item in sets:
        comparison = item["comparison"]
        for side, label in (("fer", "fer `FER(mtcnn=True)`"), ("ferstream", f"ferstream `{item['config']}`")):
            runs = [run for run in item["runs"] if run["side"] == side]
            faces = sum(comparison["clips"][name][f"{'peer' if side == 'fer' else 'ferstream'}_faces"] for name in comparison["clips"])
            rows.append(
                [
                    item["label"],
                    label,
                    f"{best_run(runs)['frames_per_s']:.2f}",
                    ", ".join(f"{run['frames_per_s']:.2f}" for run in runs),
                    faces,
                    f"**{comparison['ratio']:.2f}×**" if side == "ferstream" else "",
                ]
            )
    per_clip = [
        [
            item["resolution"],
            name,
            clip["frames"]
            if clip["ferstream_frames_processed"] == clip["frames"]
            else f"{clip['frames']} (ferstream processed only {clip['ferstream_frames_processed']})",
            clip["peer_faces"],
            clip["ferstream_faces"],
        ]
        for item in sets
        for name, clip in item["comparison"]["clips"].items()
    ]
    return (
        common.markdown_table(header, rows)
        + "\n\nFaces found per clip, one pass over every frame:\n\n"
        + common.markdown_table(["resolution", "clip", "frames", "fer", "ferstream"], per_clip)
    )


def apply_cpus(cpus: set[int]) -> None:
    """Pin every thread of this process (new threads and child processes inherit it) to ``cpus``."""
    for task in Path("/proc/self/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cpus)
        except ProcessLookupError:  # a thread that ended meanwhile
            pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", nargs="+", choices=sorted(common.RESOLUTIONS), default=["native"], help="clip sets, in order")
    parser.add_argument("--seconds", type=float, default=60.0, help="measured window of each run (the peer: whole passes, at least one)")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds of warm-up before each measured window")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each side, alternating (best is reported)")
    parser.add_argument("--config", type=Path, default=REPO_ROOT / "configs/pipeline.yaml", help="ferstream's pipeline config")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (ferstream) = TF intra/inter-op threads (fer)")
    parser.add_argument("--cpus", default=None, help="comma-separated CPU ids both sides run on (default: all this process may use)")
    parser.add_argument("--frames", type=int, default=None, help="keep each clip's first N frames (short runs only)")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="the peer's venv, outside the repository")
    parser.add_argument("--json", type=Path, default=None, help="write the full result as JSON here")
    add_setting_argument(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    cpus = {int(cpu) for cpu in args.cpus.split(",")} if args.cpus else os.sched_getaffinity(0)
    apply_cpus(cpus)
    torch.set_num_threads(args.threads)
    clips = common.shared_clips()
    if not clips:
        raise SystemExit(f"no clips in {common.shared_root() / 'media'} (set FERSTREAM_SHARED)")
    python = ensure_peer_venv(args.venv)
    result: dict[str, Any] = {
        "benchmark": "fer_peer",
        "date_utc": common.utc_now(),
        "command": common.command_line(),
        "machine": common.machine_description(),
        "git": common.git_description(),
        "busy_processes_at_start": common.busy_processes(),
        "settings": {
            "cpus": sorted(cpus),
            "threads": args.threads,
            "warmup_s": args.warmup,
            "seconds": args.seconds,
            "repeats": args.repeats,
            "frames_limit": args.frames,
            "peer_venv": str(python.parent.parent),
            "peer_install": [" ".join(step) for step in peer_install_plan()],
        },
        "sets": [],
    }
    config_label = str(args.config.resolve().relative_to(REPO_ROOT) if args.config.resolve().is_relative_to(REPO_ROOT) else args.config)
    config_label += "".join(f" {section}.{field}={value}" for section, field, value in args.settings)

    with tempfile.TemporaryDirectory(prefix="ferstream-peer-") as temp, common.RedisServer(Path(temp)) as redis_server:
        work = Path(temp)
        config = build_config(args.config, redis_server.url, args.settings)
        result["model"] = common.model_description(config.classifier.checkpoint)
        result["settings"]["ferstream_detector"] = config.detector.model_dump(mode="json")
        exclude = {redis_server.pid} if redis_server.pid is not None else set()
        for resolution in args.resolution:
            prepared = prepare_clips(clips, work, common.RESOLUTIONS[resolution], args.frames)
            label = clip_set_label(prepared)
            print(f"{label}: {args.repeats} runs of each side, alternating ...", flush=True)
            runs = []
            for repeat in range(args.repeats):
                for side in ("fer", "ferstream"):
                    if side == "fer":
                        run = run_peer(python, prepared, args.warmup, args.seconds, args.threads, work, exclude)
                    else:
                        run = run_ferstream(config, prepared, args.warmup, args.seconds, exclude)
                    run["repeat"] = repeat
                    runs.append(run)
                    print(f"  {side}: {run['frames_per_s']:.2f} frames/s over {run['wall_s']:.1f} s", flush=True)
            result["sets"].append(
                {
                    "resolution": resolution,
                    "label": label,
                    "config": config_label,
                    "clips": {clip.name: {**clip.info.to_dict(), "sha256": _sha256(clip.path)} for clip in prepared},
                    "runs": runs,
                    "comparison": compare(runs),
                }
            )
            for clip in prepared:
                clip.frames_npy.unlink()

    result["busy_processes_at_end"] = common.busy_processes()
    result["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    print()
    print(report_markdown(result["sets"]))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nJSON: {args.json}")
    return 0


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


if __name__ == "__main__":
    raise SystemExit(main())
