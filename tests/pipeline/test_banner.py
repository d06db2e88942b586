"""The start-up banner of `ferstream run`: what runs and where, never a credential."""

from pipeline.banner import describe_camera, run_banner
from pipeline.config import PipelineConfig, SourceConfig, parse_config


def config(**overrides) -> PipelineConfig:
    cameras = [
        {"camera_id": "door", "url": "rtsp://admin:hunter2@10.0.0.12/stream1"},
        {"camera_id": "clip", "url": "/tmp/clip.mp4", "loop": True, "target_fps": None},
    ]
    return parse_config(PipelineConfig, {"cameras": cameras, "events": {"redis_url": "redis://:redispw@cache:6380/0"}, **overrides}, "test")


def test_the_banner_names_source_detector_model_streams_metrics_and_how_to_stop():
    lines = run_banner(
        config(),
        model_id="compact-v2-e054",
        metrics_url="http://127.0.0.1:9108/metrics",
        print_events=True,
        summary_every_s=5,
        max_seconds=None,
    )
    text = "\n".join(lines)
    assert "door: rtsp://admin:***@10.0.0.12/stream1 (rtsp, at most 5 frames/s)" in text
    assert "clip: /tmp/clip.mp4 (file, every frame); loops at its end, and each pass starts new track ids" in text
    assert f"{PipelineConfig().detector.kind} on cpu, frames downscaled to" in text and "compact-v2-e054 (torch on cpu)" in text
    assert "Redis cache:6380, streams ferstream:events:door, ferstream:events:clip" in text
    assert "http://127.0.0.1:9108/metrics" in text and "every 5 s" in text and "Ctrl-C" in text
    assert "hunter2" not in text and "redispw" not in text


def test_a_jsonl_sink_without_metrics_or_summary_says_so():
    lines = run_banner(
        config(events={"sink": {"kind": "jsonl", "path": "out.jsonl"}}, metrics={"enabled": False}),
        model_id="m",
        metrics_url=None,
        print_events=False,
        summary_every_s=0,
        max_seconds=30,
    )
    text = "\n".join(lines)
    assert "JSON lines appended to out.jsonl" in text and "metrics   off" in text
    assert "summary" not in text and "output" not in text and "after 30 s, or Ctrl-C" in text


def test_a_file_that_does_not_loop_says_nothing_about_track_ids():
    assert "track ids" not in describe_camera(parse_config(SourceConfig, {"camera_id": "a", "url": "/tmp/a.mp4"}, "test"))
