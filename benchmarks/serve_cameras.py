"""How many real-time cameras the Ray Serve app handles on this machine, CPU only.

Usage:
    python benchmarks/serve_cameras.py [--levels 1,2,4,8] [--seconds 60] [--warmup 15]
        [--clips NAME,NAME] [--fps F] [--detector-seconds 15] [--num-cpus N] [--json OUT]

What runs, all started by this script and torn down at the end:

* a ``redis-server`` on a free loopback port (events, camera registry);
* a local Ray head (``ray start --head``, free ports, ``--num-cpus`` = this machine's cores unless
  given) and the app with ``serve run`` on a copy of ``configs/serve-cpu.yaml`` that only changes
  the HTTP port and drops the demo cameras file; ``FERSTREAM_REDIS_URL`` points the app at the
  Redis above.

Then, for each level (1, 2, 4, 8 cameras), over the app's HTTP API: ``POST /streams`` that many
file cameras looping the shared clips in real time (``loop: true``, realtime pacing, ``fps`` =
the clip's frame rate unless ``--fps``), wait until every camera streams, warm up, measure a fixed
window, then ``DELETE`` them all. Nothing else is restarted between levels. Per level:

* processed frames/s per camera and in total, and dropped frames, from each camera's status
  (``GET /streams``: ``frames_decoded``, ``frames_dropped``; processed = decoded - dropped), the
  window's duration taken from the statuses' own ``last_frame_time`` so the ~1 s age of a status
  does not bias the rate; the split of the drops by reason (``stale``, ``fps_limit``) from Ray's
  metrics port (``ray_ferstream_frames_dropped_total``), which Ray exports with a lag of up to its
  report interval, so that split is approximate;
* capture-to-event latency p50/p99, exact: ``publish_time - capture_time`` of every event in Redis
  whose ``publish_time`` falls in the window;
* mean detector batch size and detector call time in the replica (Ray metrics deltas, same lag);
* CPU use of every process over the window (from /proc), so anything else running is visible.

The detector's own throughput is measured in this process, before the first level and after the
last one while the app is idle: the configured detector's ``detect_batch`` on the clips' frames, downscaled to
the app's ``detection_size``, at batch size 1 and the Serve config's ``max_batch_size``, with one
torch thread (what Ray gives a ``num_cpus: 1`` replica: ``OMP_NUM_THREADS=1``) and with all cores.
The ratio column divides the level's total processed frames/s by that (mean of before/after).

Teardown stops only what this script started, by process id: ``serve run`` (SIGINT), ``serve
shutdown``, then the processes of this Ray cluster (found by its private temp dir), then Redis.
``ray stop --force`` is not used by default because it kills every Ray process on the machine,
other people's clusters included; ``--ray-stop-force`` adds it for machines where nothing else runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bench_common as common
import redis
import requests
import yaml
from bench_common import REPO_ROOT
from prometheus_client.parser import text_string_to_metric_families
from serve_harness import SERVE_CONFIG, ServeApp
from serve_report import report_markdown

from pipeline.config import PipelineConfig, load_config
from pipeline.detection import FaceDetector, build_detector, downscale_for_detection
from pipeline.events import ExpressionEvent, stream_key

log = logging.getLogger("ferstream.bench.serve")

# Ray metrics this benchmark reads, summed over Ray's own labels (worker, node, ...). Only counts
# are used: Ray 2.60 (its OpenTelemetry metric recorder) exports a histogram's _sum as bucket midpoints
# times bucket counts, so sum/count means are not real means (a batch of 1 reads as 0.5).
RAY_METRIC_LABELS = ("camera", "reason", "stage", "le")
RAY_METRIC_PREFIX = "ray_ferstream_"


# -- measuring ------------------------------------------------------------------------------------


def scrape_ray_metrics(metrics_port: int) -> dict[str, float]:
    """ferstream's series on Ray's metrics port, summed over Ray's labels: key ``name{label=value,...}``."""
    text = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30).text
    values: dict[str, float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if not sample.name.startswith(RAY_METRIC_PREFIX) or sample.name.endswith("_sum"):
                continue
            labels = ",".join(f"{key}={sample.labels[key]}" for key in RAY_METRIC_LABELS if key in sample.labels)
            values[f"{sample.name}{{{labels}}}"] += float(sample.value)
    return dict(values)


def cpu_ticks() -> dict[int, tuple[int, str]]:
    return common._proc_cpu_ticks()


def process_role(command: str, mine: bool) -> str:
    """A short name for a process in the CPU table."""
    if "ServeReplica:" in command:
        # "ray::ServeReplica:<app>:<Deployment>[.<method in progress>]"
        return command.split("ServeReplica:", 1)[1].split()[0].split(":")[-1].split(".")[0] + " replica"
    for marker, role in (
        ("ProxyActor", "Serve proxy"),
        ("ServeController", "Serve controller"),
        ("raylet", "raylet"),
        ("gcs_server", "GCS"),
        ("DashboardAgent", "Ray dashboard agent"),
        ("dashboard", "Ray dashboard"),
        ("redis-server", "redis-server"),
    ):
        if marker in command:
            return role if mine else f"other: {role}"
    if not mine:
        return "other: " + command[:80]
    return "Ray (other)"


def cpu_usage(
    before: dict[int, tuple[int, str]], after: dict[int, tuple[int, str]], seconds: float, mine: set[int]
) -> list[dict[str, Any]]:
    """Percent of one core per role over the window (processes that lived through it)."""
    hz = os.sysconf("SC_CLK_TCK")
    by_role: dict[str, float] = defaultdict(float)
    for pid, (ticks, command) in after.items():
        if pid not in before:
            continue
        used = (ticks - before[pid][0]) / hz
        if used <= 0:
            continue
        role = "benchmark process" if pid == os.getpid() else process_role(command, pid in mine)
        by_role[role] += used
    rows = [{"process": role, "cpu_percent": round(100 * used / seconds, 1)} for role, used in by_role.items()]
    return sorted((row for row in rows if row["cpu_percent"] >= 0.5), key=lambda row: -row["cpu_percent"])


def stream_statuses(app: ServeApp) -> dict[str, dict[str, Any]]:
    response = requests.get(f"{app.api}/streams", headers=app.headers, timeout=30)
    response.raise_for_status()
    return {stream["camera_id"]: stream for stream in response.json()}


def events_between(client: redis.Redis, prefix: str, camera_id: str, start: float, end: float) -> list[ExpressionEvent]:
    """Events whose publish_time is in [start, end) (the stream ids bound the read with a margin)."""
    low, high = f"{int((start - 5) * 1000)}", f"{int((end + 5) * 1000)}"
    events = [ExpressionEvent.from_fields(fields) for _id, fields in client.xrange(stream_key(prefix, camera_id), low, high)]
    return [event for event in events if event.publish_time is not None and start <= event.publish_time < end]


@dataclass
class Snapshot:
    wall: float
    statuses: dict[str, dict[str, Any]]
    ray: dict[str, float]
    ticks: dict[int, tuple[int, str]]


def take_snapshot(app: ServeApp) -> Snapshot:
    wall = time.time()
    return Snapshot(wall, stream_statuses(app), scrape_ray_metrics(app.ports["metrics"]), cpu_ticks())


def ray_delta(start: Snapshot, end: Snapshot, key: str) -> float:
    return end.ray.get(key, 0.0) - start.ray.get(key, 0.0)


def measure_level(
    app: ServeApp,
    client: redis.Redis,
    prefix: str,
    cameras: int,
    clips: Sequence[common.ClipInfo],
    fps: float | None,
    warmup_s: float,
    seconds: float,
) -> dict[str, Any]:
    camera_ids = [f"bench-n{cameras}-c{index}" for index in range(cameras)]
    clip_of = {camera_id: clips[index % len(clips)] for index, camera_id in enumerate(camera_ids)}
    for camera_id in camera_ids:
        clip = clip_of[camera_id]
        # `loop` is a top-level field of the API (the app rejects it inside options); realtime
        # pacing is SourceConfig's default for files, stated anyway.
        body = {
            "camera_id": camera_id,
            "url": clip.path.resolve().as_uri(),  # the API takes explicit URLs only
            "target_fps": fps if fps is not None else clip.fps,
            "loop": True,
            "options": {"realtime": True},
        }
        response = requests.post(f"{app.api}/streams", json=body, headers=app.headers, timeout=30)
        if response.status_code != 201:
            raise RuntimeError(f"POST /streams {body}: {response.status_code} {response.text}")

    def all_streaming() -> bool:
        app.check_alive()
        statuses = stream_statuses(app)
        return all(statuses.get(camera_id, {}).get("state") == "streaming" for camera_id in camera_ids)

    common.wait_until(all_streaming, 180, f"{cameras} camera(s) to stream", interval_s=1.0)
    time.sleep(warmup_s)
    app.check_alive()
    mine = app.own_pids() | {os.getpid()}
    start = take_snapshot(app)
    time.sleep(seconds)
    end = take_snapshot(app)
    app.check_alive()
    mine |= app.own_pids()

    # Remove the level's cameras and wait until their events stop (the ingest replica notices
    # within its reconcile interval; a frame in flight finishes first).
    for camera_id in camera_ids:
        requests.delete(f"{app.api}/streams/{camera_id}", headers=app.headers, timeout=30).raise_for_status()
    last_counts: list[int] = []
    stable_since = time.monotonic()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        counts = [int(client.xlen(stream_key(prefix, camera_id))) for camera_id in camera_ids]
        if counts != last_counts:
            last_counts, stable_since = counts, time.monotonic()
        elif time.monotonic() - stable_since >= 3.0:
            break
        time.sleep(0.5)

    per_camera = []
    latencies: list[float] = []
    model_ids: set[str] = set()
    for camera_id in camera_ids:
        s0, s1 = start.statuses[camera_id], end.statuses[camera_id]
        decoded = s1["frames_decoded"] - s0["frames_decoded"]
        dropped = s1["frames_dropped"] - s0["frames_dropped"]
        processed = decoded - dropped
        span = (s1["last_frame_time"] or 0.0) - (s0["last_frame_time"] or 0.0)
        events = events_between(client, prefix, camera_id, start.wall, end.wall)
        camera_latencies = [event.publish_time - event.capture_time for event in events if event.publish_time is not None]
        latencies.extend(camera_latencies)
        model_ids.update(event.model_id for event in events)
        per_camera.append(
            {
                "camera_id": camera_id,
                "clip": clip_of[camera_id].path.name,
                "status_span_s": round(span, 3),
                "frames_decoded": decoded,
                "frames_processed": processed,
                "frames_dropped": dropped,
                "decoded_fps": round(decoded / span, 3) if span > 0 else None,
                "processed_fps": round(processed / span, 3) if span > 0 else None,
                "dropped_per_s": round(dropped / span, 3) if span > 0 else None,
                "frames_with_events": len({event.frame_index for event in events}),
                "events": len(events),
                "latency_p50_ms": round(1000 * statistics.median(camera_latencies), 1) if camera_latencies else None,
                "reconnects": s1["reconnects"],
                "owner": s1.get("owner"),
            }
        )
    window = end.wall - start.wall
    latencies.sort()
    processed_fps = [camera["processed_fps"] or 0.0 for camera in per_camera]
    dropped_by_reason = {
        reason: sum(ray_delta(start, end, f"{RAY_METRIC_PREFIX}frames_dropped_total{{camera={c},reason={reason}}}") for c in camera_ids)
        for reason in ("stale", "fps_limit")
    }

    # Detector batches: the number of batches is the batch_size histogram's count; every processed
    # frame is one detect request, so requests / batches is the mean batch size.
    detect_batches = ray_delta(start, end, f"{RAY_METRIC_PREFIX}batch_size_count{{stage=detect}}")
    ray_processed = sum(ray_delta(start, end, f"{RAY_METRIC_PREFIX}frames_processed_total{{camera={c}}}") for c in camera_ids)
    detect_le = {
        bound: ray_delta(start, end, f"{RAY_METRIC_PREFIX}batch_size_bucket{{stage=detect,le={bound}}}") for bound in ("1.0", "2.0", "4.0")
    }
    batch_shares = (
        {
            "1": round(detect_le["1.0"] / detect_batches, 3),
            "2": round((detect_le["2.0"] - detect_le["1.0"]) / detect_batches, 3),
            "3-4": round((detect_le["4.0"] - detect_le["2.0"]) / detect_batches, 3),
            "5+": round((detect_batches - detect_le["4.0"]) / detect_batches, 3),
        }
        if detect_batches > 0
        else {}
    )

    return {
        "cameras": cameras,
        "window_s": round(window, 3),
        "processed_fps_per_camera_mean": round(statistics.fmean(processed_fps), 3),
        "processed_fps_per_camera_min": round(min(processed_fps), 3),
        "processed_fps_per_camera_max": round(max(processed_fps), 3),
        "processed_fps_total": round(sum(processed_fps), 3),
        "decoded_fps_total": round(sum(camera["decoded_fps"] or 0.0 for camera in per_camera), 3),
        "frames_dropped": sum(camera["frames_dropped"] for camera in per_camera),
        "frames_decoded": sum(camera["frames_decoded"] for camera in per_camera),
        "dropped_per_s_total": round(sum(camera["dropped_per_s"] or 0.0 for camera in per_camera), 3),
        "dropped_by_reason_ray_metrics": {reason: round(value) for reason, value in dropped_by_reason.items()},
        "events": len(latencies),
        "events_per_s": round(len(latencies) / window, 3),
        "latency_ms": {
            "p50": round(1000 * common.percentile(latencies, 50), 1),
            "p90": round(1000 * common.percentile(latencies, 90), 1),
            "p99": round(1000 * common.percentile(latencies, 99), 1),
            "max": round(1000 * latencies[-1], 1) if latencies else None,
            "mean": round(1000 * statistics.fmean(latencies), 1) if latencies else None,
        },
        "replica_metrics": {
            "note": "Ray metrics port, deltas over the window; exported every ~10 s, so approximate",
            "detect_batches": round(detect_batches),
            "frames_processed": round(ray_processed),
            # Two processes' counters exported at different moments: only roughly the mean batch.
            "frames_per_detect_batch": round(ray_processed / detect_batches, 2) if detect_batches > 0 else None,
            "detect_batch_size_shares": batch_shares,
            "detect_batches_per_s": round(detect_batches / window, 3),
        },
        "model_ids_in_events": sorted(model_ids),
        "cpu_percent_by_process": cpu_usage(start.ticks, end.ticks, window, mine),
        "per_camera": per_camera,
    }


def measure_detector(
    detector: FaceDetector,
    images: Sequence[Any],
    batch_sizes: Iterable[int],
    thread_counts: Iterable[int],
    seconds: float,
    app: ServeApp,
) -> list[dict[str, Any]]:
    import torch

    default_threads = torch.get_num_threads()
    rows = []
    try:
        for threads in thread_counts:
            torch.set_num_threads(threads)
            for batch_size in batch_sizes:
                detector.detect_batch(list(images[:batch_size]))  # warm-up
                frames = calls = cursor = 0
                ticks_before = common.cpu_snapshot()
                started = time.perf_counter()
                while time.perf_counter() - started < seconds:
                    batch = [images[(cursor + k) % len(images)] for k in range(batch_size)]
                    cursor += batch_size
                    detector.detect_batch(batch)
                    frames += batch_size
                    calls += 1
                elapsed = time.perf_counter() - started
                ticks_after = common.cpu_snapshot()
                own = app.own_pids()
                everything = common.other_processes_cpu(ticks_before, ticks_after, elapsed, set(), min_percent=0.0)
                rows.append(
                    {
                        "threads": threads,
                        "batch_size": batch_size,
                        "frames": frames,
                        "seconds": round(elapsed, 3),
                        "frames_per_s": round(frames / elapsed, 3),
                        "ms_per_batch": round(1000 * elapsed / calls, 1),
                        # The idle app's own processes, and anything else, while this ran.
                        "serve_app_cpu_percent": round(sum(item["cpu_percent"] for item in everything if item["pid"] in own), 1),
                        "other_processes_cpu": [item for item in everything if item["pid"] not in own and item["cpu_percent"] >= 2.0],
                    }
                )
    finally:
        torch.set_num_threads(default_threads)
    return rows


# -- main -----------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="1,2,4,8", help="comma-separated camera counts")
    parser.add_argument("--seconds", type=float, default=60.0, help="measured window per level")
    parser.add_argument("--warmup", type=float, default=15.0, help="seconds per level after every camera streams, before measuring")
    parser.add_argument("--clips", default=None, help="comma-separated shared clip names or paths (default: all shared clips, alternating)")
    parser.add_argument("--fps", type=float, default=None, help="per-camera fps target sent as `fps` (default: each clip's frame rate)")
    parser.add_argument("--detector-seconds", type=float, default=15.0, help="seconds per detector-alone measurement")
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="CPUs the Ray head advertises (default: this machine's)")
    parser.add_argument("--serve-config", type=Path, default=SERVE_CONFIG)
    parser.add_argument("--ray-stop-force", action="store_true", help="also run `ray stop --force` at the end (kills ALL Ray processes)")
    parser.add_argument("--json", type=Path, default=None, help="write the full result as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    levels = [int(level) for level in args.levels.split(",") if level.strip()]

    clip_paths = [common.resolve_clip(name) for name in args.clips.split(",")] if args.clips else list(common.shared_clips().values())
    if not clip_paths:
        raise SystemExit(f"no shared clips in {common.shared_root() / 'media'} (set FERSTREAM_SHARED)")
    decoded = [common.decode_clip(path) for path in clip_paths]
    clips = [info for info, _images in decoded]

    serve_config = yaml.safe_load(args.serve_config.read_text())
    app_args = serve_config["applications"][0]["args"]
    pipeline_config: PipelineConfig = load_config(REPO_ROOT / app_args["pipeline_config"])
    deployments = {item["name"]: item for item in serve_config["applications"][0]["deployments"]}
    detector_deployment = deployments.get("FaceDetector", {})
    max_batch = int((detector_deployment.get("user_config") or {}).get("max_batch_size", 8))
    replica_cpus = float((detector_deployment.get("ray_actor_options") or {}).get("num_cpus", 1))
    replica_threads = max(1, int(replica_cpus))  # Ray: OMP_NUM_THREADS = floor(num_cpus), at least 1
    all_threads = os.cpu_count() or 1
    detection_size = pipeline_config.detector.detection_size
    images = [downscale_for_detection(image, detection_size).image for _info, frames in decoded for image in frames]
    detector = build_detector(pipeline_config.detector)

    result: dict[str, Any] = {
        "benchmark": "serve_cameras",
        "date_utc": common.utc_now(),
        "command": common.command_line(),
        "machine": common.machine_description(),
        "git": common.git_description(),
        "model": common.model_description(pipeline_config.classifier.checkpoint),
        "settings": {
            "levels": levels,
            "seconds": args.seconds,
            "warmup_s": args.warmup,
            "clips": [clip.to_dict() for clip in clips],
            "fps": args.fps,
            "num_cpus": args.num_cpus,
            "serve_config": str(
                args.serve_config.relative_to(REPO_ROOT) if args.serve_config.is_relative_to(REPO_ROOT) else args.serve_config
            ),
            "serve_deployments": deployments,
            "detection_size": detection_size,
            "detector_max_batch_size": max_batch,
            "replica_torch_threads": replica_threads,
            "all_threads": all_threads,
            "detector_seconds": args.detector_seconds,
        },
        "busy_processes_at_start": common.busy_processes(),
        "detector_alone": {},
        "levels": [],
    }
    batch_sizes = sorted({1, max_batch})
    thread_counts = sorted({replica_threads, all_threads})

    with tempfile.TemporaryDirectory(prefix="ferstream-bench-") as work:
        app = ServeApp(Path(work), args.num_cpus, args.serve_config, file_dirs=[clip.path.resolve().parent for clip in clips])
        try:
            log.info("starting redis, Ray (num_cpus=%d) and `serve run`", args.num_cpus)
            app.start()
            assert app.redis is not None
            client = redis.Redis.from_url(app.redis.url)
            prefix = pipeline_config.events.stream_prefix
            time.sleep(5)  # let the freshly started replicas settle
            log.info("detector alone, before the cameras")
            result["detector_alone"]["before"] = measure_detector(detector, images, batch_sizes, thread_counts, args.detector_seconds, app)
            for cameras in levels:
                log.info("level: %d camera(s)", cameras)
                level = measure_level(app, client, prefix, cameras, clips, args.fps, args.warmup, args.seconds)
                result["levels"].append(level)
                log.info(
                    "%d camera(s): %.2f fps total, p50 %.0f ms, p99 %.0f ms",
                    cameras,
                    level["processed_fps_total"],
                    level["latency_ms"]["p50"],
                    level["latency_ms"]["p99"],
                )
            result["serve_status_at_end"] = app.serve_status()
            log.info("detector alone, after the cameras")
            result["detector_alone"]["after"] = measure_detector(detector, images, batch_sizes, thread_counts, args.detector_seconds, app)
            result["busy_processes_at_end"] = common.busy_processes()
        finally:
            log.info("tearing down")
            app.stop(ray_stop_force=args.ray_stop_force)
            result["ray_processes_left_after_teardown"] = app.cluster_pids()

    print(report_markdown(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"\nJSON: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
