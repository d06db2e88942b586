"""Single-process pipeline throughput: how many frames a second ``StreamPipeline`` processes on this
machine, and where the time of a frame goes.

Usage:
    python benchmarks/pipeline_throughput.py [--clip NAME|PATH] [--seconds 60] [--warmup 10]
        [--set detector.detection_size=N ...] [--cameras 1] [--threads N] [--config configs/pipeline.yaml] [--json OUT]
        [--clips NAME,NAME] [--realtime]

What runs: the real ``StreamPipeline`` (``pipeline/runner.py``) with real MTCNN, the shipped
expression checkpoint (``classifier.checkpoint`` of the config; null = the default model) and a
real ``redis-server`` that this script starts on a free loopback port. Each camera is the clip
read with ``realtime: false`` (decode only as fast as frames are taken; nothing is dropped),
``target_fps: null`` and ``loop: true``, so the pipeline is never starved and never throttled:
the result is its saturated throughput.

``--realtime`` instead runs the cameras as ``benchmarks/serve_cameras.py`` does: each clip paced at
its own frame rate (``realtime: true``, ``target_fps`` = the clip's fps), the freshest frame taken
and the rest dropped as stale. With ``--clips`` the cameras alternate between those clips (as
``serve_cameras.py`` does with all shared clips), so the two scripts measure the same cameras, in
one process and under Serve.

After ``--warmup`` seconds the metrics are snapshotted, the pipeline runs ``--seconds`` more,
and the report is the difference: frames/s (``frames_processed``), faces/s, events/s, and per
stage the ``stage_latency_seconds`` histogram's sum/count: milliseconds per call, per processed
frame, and as a share of the wall time. detect/classify/track/publish run one after the other
on the processing thread; the rest of that thread's time ("other") is face cropping, collecting
frames and bookkeeping. decode runs on each camera's own thread, in parallel with processing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bench_common as common
import torch
import yaml
from bench_common import REPO_ROOT

from pipeline.config import PipelineConfig, SourceConfig, dump_config, load_config, parse_config
from pipeline.events import EventPublisher
from pipeline.metrics import STAGES, PipelineMetrics
from pipeline.runner import ModelStages, StreamPipeline

PROCESSING_STAGES = ("detect", "classify", "track", "publish")
CAMERA_KEY = "camera:"  # snapshot keys of per-camera counters: camera:<id>:<counter>


@dataclass(frozen=True)
class Snapshot:
    at: float  # time.perf_counter()
    values: dict[str, float]


def snapshot(metrics: PipelineMetrics, camera_ids: list[str]) -> Snapshot:
    registry = metrics.registry

    def value(name: str, labels: dict[str, str]) -> float:
        return registry.get_sample_value(f"ferstream_{name}", labels) or 0.0

    values: dict[str, float] = {}
    for counter in ("frames_decoded_total", "frames_processed_total", "faces_detected_total", "events_published_total"):
        values[counter] = sum(value(counter, {"camera": camera}) for camera in camera_ids)
    for reason in ("stale", "fps_limit"):
        values[f"frames_dropped_{reason}"] = sum(value("frames_dropped_total", {"camera": c, "reason": reason}) for c in camera_ids)
    for stage in STAGES:
        values[f"{stage}_sum"] = value("stage_latency_seconds_sum", {"stage": stage})
        values[f"{stage}_count"] = value("stage_latency_seconds_count", {"stage": stage})
    for stage in ("detect", "classify"):
        values[f"batch_{stage}_sum"] = value("batch_size_sum", {"stage": stage})
        values[f"batch_{stage}_count"] = value("batch_size_count", {"stage": stage})
    values["e2e_sum"] = sum(value("end_to_end_latency_seconds_sum", {"camera": c}) for c in camera_ids)
    values["e2e_count"] = sum(value("end_to_end_latency_seconds_count", {"camera": c}) for c in camera_ids)
    for camera in camera_ids:
        for counter in ("frames_processed_total", "faces_detected_total"):
            values[f"{CAMERA_KEY}{camera}:{counter}"] = value(counter, {"camera": camera})
    return Snapshot(time.perf_counter(), values)


def camera_counts(start: Snapshot, end: Snapshot) -> dict[str, dict[str, Any]]:
    """camera -> frames processed, faces detected and faces per frame between two snapshots."""
    cameras: dict[str, dict[str, Any]] = {}
    for key, value in end.values.items():
        if key.startswith(CAMERA_KEY):
            camera, counter = key[len(CAMERA_KEY) :].rsplit(":", 1)
            cameras.setdefault(camera, {})[counter] = int(value - start.values.get(key, 0.0))
    return {
        camera: {
            "frames": counts["frames_processed_total"],
            "faces": counts["faces_detected_total"],
            "faces_per_frame": round(counts["faces_detected_total"] / counts["frames_processed_total"], 3)
            if counts["frames_processed_total"]
            else None,
        }
        for camera, counts in cameras.items()
    }


def build_pipeline(config: PipelineConfig) -> tuple[StreamPipeline, PipelineMetrics]:
    """The real ``StreamPipeline`` of ``ferstream run`` with its own metrics registry (no HTTP server)."""
    metrics = PipelineMetrics()
    models = ModelStages.build(config)
    return StreamPipeline(config, metrics, models, EventPublisher(config.events, metrics)), metrics


def unpaced_source(camera_id: str, clip: Path, loop: bool = True) -> SourceConfig:
    """A clip as a camera that is never starved and never throttled: every frame, no pacing, nothing dropped."""
    return SourceConfig(camera_id=camera_id, url=str(clip), realtime=False, target_fps=None, loop=loop)


def realtime_source(camera_id: str, clip: common.ClipInfo) -> SourceConfig:
    """A clip as a live camera, as the Serve benchmark adds it: paced at the clip's frame rate, looping."""
    return SourceConfig(camera_id=camera_id, url=str(clip.path), realtime=True, target_fps=clip.fps, loop=True)


@dataclass(frozen=True)
class Window:
    """A measured window: metrics and per-process CPU ticks at its start and end."""

    start: Snapshot
    end: Snapshot
    ticks_before: dict[int, tuple[int, str]]
    ticks_after: dict[int, tuple[int, str]]

    def own_cpu_percent(self) -> float:
        own = self.ticks_after.get(os.getpid(), (0, ""))[0] - self.ticks_before.get(os.getpid(), (0, ""))[0]
        return round(100 * own / os.sysconf("SC_CLK_TCK") / (self.end.at - self.start.at), 1)


def measure_window(pipeline: StreamPipeline, metrics: PipelineMetrics, camera_ids: list[str], warmup: float, seconds: float) -> Window:
    """Run ``warmup`` seconds, then measure ``seconds`` more (the cameras must be added already)."""
    pipeline.run(max_seconds=warmup)
    ticks_before = common.cpu_snapshot()
    start = snapshot(metrics, camera_ids)
    pipeline.run(max_seconds=seconds)
    end = snapshot(metrics, camera_ids)
    return Window(start, end, ticks_before, common.cpu_snapshot())


def parse_setting(text: str) -> tuple[str, str, Any]:
    """``section.field=value`` (the value read as YAML) from ``--set``."""
    key, separator, value = text.partition("=")
    section, dot, field = key.partition(".")
    if not (separator and dot and section and field):
        raise argparse.ArgumentTypeError(f"--set wants section.field=value, got {text!r}")
    return section, field, yaml.safe_load(value)


def add_setting_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="settings",
        type=parse_setting,
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="change one setting of --config, e.g. detector.interval=3 (repeatable; validated like the config)",
    )


def build_config(base: Path, redis_url: str, settings: list[tuple[str, str, Any]]) -> PipelineConfig:
    data = dump_config(load_config(base))
    data["cameras"] = []
    data["events"]["redis_url"] = redis_url
    data["metrics"]["enabled"] = False  # read from the registry directly, no HTTP server needed
    for section, field, value in settings:
        data.setdefault(section, {})[field] = value
    return parse_config(PipelineConfig, data, "benchmark config")


def summarize(start: Snapshot, end: Snapshot) -> dict[str, Any]:
    delta = {key: end.values[key] - start.values.get(key, 0.0) for key in end.values}
    wall = end.at - start.at
    frames = delta["frames_processed_total"]
    stages: dict[str, dict[str, float | None]] = {}
    for stage in STAGES:
        total, calls = delta[f"{stage}_sum"], delta[f"{stage}_count"]
        stages[stage] = {
            "calls": int(calls),
            "seconds": round(total, 4),
            "ms_per_call": round(1000 * total / calls, 3) if calls else None,
            "ms_per_frame": round(1000 * total / frames, 3) if frames else None,
            "share_of_wall": round(total / wall, 4),
        }
    loop_busy = sum(delta[f"{stage}_sum"] for stage in PROCESSING_STAGES)
    stages["other"] = {
        "calls": None,
        "seconds": round(wall - loop_busy, 4),
        "ms_per_call": None,
        "ms_per_frame": round(1000 * (wall - loop_busy) / frames, 3) if frames else None,
        "share_of_wall": round((wall - loop_busy) / wall, 4),
    }
    return {
        "wall_s": round(wall, 3),
        "frames": int(frames),
        "frames_per_s": round(frames / wall, 3),
        "faces": int(delta["faces_detected_total"]),
        "faces_per_s": round(delta["faces_detected_total"] / wall, 3),
        "faces_per_frame": round(delta["faces_detected_total"] / frames, 3) if frames else None,
        "events_per_s": round(delta["events_published_total"] / wall, 3),
        "frames_decoded": int(delta["frames_decoded_total"]),
        "frames_dropped": {"stale": int(delta["frames_dropped_stale"]), "fps_limit": int(delta["frames_dropped_fps_limit"])},
        "mean_detect_batch": round(delta["batch_detect_sum"] / delta["batch_detect_count"], 3) if delta["batch_detect_count"] else None,
        "mean_classify_batch": (
            round(delta["batch_classify_sum"] / delta["batch_classify_count"], 3) if delta["batch_classify_count"] else None
        ),
        "mean_capture_to_publish_ms": round(1000 * delta["e2e_sum"] / delta["e2e_count"], 2) if delta["e2e_count"] else None,
        "stages": stages,
        "cameras": camera_counts(start, end),
    }


def report_markdown(result: dict[str, Any]) -> str:
    summary = result["summary"]
    header = ["stage", "calls", "ms/call", "ms/frame", "share of wall time"]
    rows = []
    for stage in (*PROCESSING_STAGES, "other", "decode"):
        item = summary["stages"][stage]
        name = {"other": "other (crop, collect, bookkeeping)", "decode": "decode (own thread, overlaps)"}.get(stage, stage)
        rows.append(
            [
                name,
                item["calls"] if item["calls"] is not None else "",
                f"{item['ms_per_call']:.2f}" if item["ms_per_call"] is not None else "",
                f"{item['ms_per_frame']:.2f}" if item["ms_per_frame"] is not None else "",
                f"{100 * item['share_of_wall']:.1f} %",
            ]
        )
    settings = result["settings"]
    clip_names = ", ".join(f"`{clip['name']}`" for clip in settings.get("clips", [settings["clip"]]))
    pacing = " paced in real time" if settings["source"]["realtime"] else ""
    head = (
        f"clip(s) {clip_names} ({settings['clip']['width']}x{settings['clip']['height']}), "
        f"{settings['cameras']} camera(s){pacing}, detection_size {settings['detection_size']}, "
        f"{settings['torch_threads']} torch thread(s), "
        f"{summary['wall_s']:.1f} s measured after {settings['warmup_s']:g} s warm-up\n\n"
        f"**{summary['frames_per_s']:.2f} frames/s**, {summary['faces_per_s']:.2f} faces/s "
        f"({summary['faces_per_frame']} faces/frame), {summary['events_per_s']:.2f} events/s, "
        f"mean detector batch {summary['mean_detect_batch']}, "
        f"{summary['frames']} frames in {summary['wall_s']:.1f} s\n\n"
    )
    others = result.get("other_processes_cpu_during_window") or []
    foot = "\n\nOther processes during the window (≥ 2 % of a core): " + (
        ", ".join(f"`{item['command'][:60]}` {item['cpu_percent']:.0f} %" for item in others) if others else "none"
    )
    foot += f"; this process used {summary['benchmark_process_cpu_percent']:.0f} % of a core."
    return head + common.markdown_table(header, rows) + foot


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clip", default=common.DEFAULT_CLIP, help="shared clip name (stem) or a video path")
    parser.add_argument("--clips", default=None, help="comma-separated clips the cameras alternate between (instead of --clip)")
    parser.add_argument("--realtime", action="store_true", help="cameras paced at their clip's frame rate, as serve_cameras.py runs them")
    parser.add_argument("--seconds", type=float, default=60.0, help="measured window after the warm-up")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds run before measuring")
    parser.add_argument("--cameras", type=int, default=1, help="copies of the clip processed together (batched)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's, = cores)")
    parser.add_argument("--config", type=Path, default=REPO_ROOT / "configs/pipeline.yaml", help="base pipeline config")
    parser.add_argument("--json", type=Path, default=None, help="write the full result as JSON here")
    add_setting_argument(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    clip_paths = [common.resolve_clip(name) for name in (args.clips.split(",") if args.clips else [args.clip])]
    clips = [common.decode_clip(path)[0] for path in clip_paths]
    clip_info = clips[0]
    result: dict[str, Any] = {
        "benchmark": "pipeline_throughput",
        "date_utc": common.utc_now(),
        "command": common.command_line(),
        "machine": common.machine_description(),
        "git": common.git_description(),
        "busy_processes_at_start": common.busy_processes(),
    }

    with tempfile.TemporaryDirectory(prefix="ferstream-bench-") as work, common.RedisServer(Path(work)) as redis_server:
        config = build_config(args.config, redis_server.url, args.settings)
        result["model"] = common.model_description(config.classifier.checkpoint)
        result["settings"] = {
            "clip": clip_info.to_dict(),
            "clips": [clip.to_dict() for clip in clips],
            "cameras": args.cameras,
            "torch_threads": torch.get_num_threads(),
            "detection_size": config.detector.detection_size,
            "detector": config.detector.model_dump(mode="json"),
            "classifier_batch_size": config.classifier.batch_size,
            "events_policy": config.events.policy,
            "warmup_s": args.warmup,
            "seconds": args.seconds,
            "source": {"realtime": args.realtime, "target_fps": "the clip's fps" if args.realtime else None, "loop": True},
        }
        pipeline, metrics = build_pipeline(config)
        camera_ids = [f"bench{index}" for index in range(args.cameras)]
        try:
            for index, camera_id in enumerate(camera_ids):
                clip = clips[index % len(clips)]
                pipeline.add_camera(realtime_source(camera_id, clip) if args.realtime else unpaced_source(camera_id, clip.path))
            window = measure_window(pipeline, metrics, camera_ids, args.warmup, args.seconds)
            exclude = {redis_server.pid} if redis_server.pid is not None else set()
            result["other_processes_cpu_during_window"] = common.other_processes_cpu(
                window.ticks_before, window.ticks_after, window.end.at - window.start.at, exclude
            )
        finally:
            pipeline.close()

    result["summary"] = summarize(window.start, window.end)
    result["summary"]["benchmark_process_cpu_percent"] = window.own_cpu_percent()
    result["busy_processes_at_end"] = common.busy_processes()
    result["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    print(report_markdown(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
