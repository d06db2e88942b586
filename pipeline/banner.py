"""The lines ``ferstream run`` prints before its first event: what runs, where its output goes, how to stop it.

Credentials never appear: camera URLs go through ``redact_url`` and Redis shows as ``host:port``.
"""

from __future__ import annotations

from pipeline.config import PipelineConfig, SourceConfig
from pipeline.events import stream_key
from pipeline.redis_check import redis_address
from pipeline.url_policy import redact_url


def describe_camera(camera: SourceConfig) -> str:
    fps = "every frame" if camera.target_fps is None else f"at most {camera.target_fps:g} frames/s"
    kind = "file" if camera.is_file else camera.url.split(":", 1)[0]
    text = f"{camera.camera_id}: {redact_url(camera.url)} ({kind}, {fps})"
    if camera.is_file and camera.loop:
        # The tracker matches boxes frame to frame; the jump back to the first frame breaks every match.
        text += "; loops at its end, and each pass starts new track ids"
    return text


def describe_sink(config: PipelineConfig) -> str:
    events = config.events
    if events.sink.kind == "jsonl":
        return "JSON lines to standard output" if events.sink.path == "-" else f"JSON lines appended to {events.sink.path}"
    streams = ", ".join(stream_key(events.stream_prefix, camera.camera_id) for camera in config.cameras)
    return f"Redis {redis_address(events.redis_url)}, streams {streams} (read them with `ferstream tail --camera ID`)"


def run_banner(
    config: PipelineConfig,
    *,
    model_id: str,
    metrics_url: str | None,
    print_events: bool,
    summary_every_s: float,
    max_seconds: float | None,
) -> list[str]:
    detector = config.detector
    classifier = config.classifier
    lines = ["ferstream run:"]
    lines += [f"  camera    {describe_camera(camera)}" for camera in config.cameras]
    lines.append(f"  detector  {detector.kind} on {detector.device}, frames downscaled to {detector.detection_size} px")
    lines.append(f"  model     {model_id} ({classifier.backend} on {classifier.device})")
    lines.append(f"  events    {describe_sink(config)}")
    lines.append(f"  metrics   {metrics_url or 'off (metrics.enabled: false)'}")
    if print_events:
        lines.append("  output    one JSON line per face per processed frame on standard output")
    if summary_every_s > 0:
        lines.append(f"  summary   every {summary_every_s:g} s here: each track's current emotion and its share over that time")
    stop = "Ctrl-C" if max_seconds is None else f"after {max_seconds:g} s, or Ctrl-C"
    lines.append(f"  stop      {stop}; exit status 0 ok, 3 no camera worked, 4 events lost (README: Exit codes)")
    return lines
