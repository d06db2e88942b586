from pathlib import Path

import pytest
from pydantic import ValidationError

from pipeline.config import BackoffConfig, ConfigError, PipelineConfig, SourceConfig, load_config, parse_config, url_scheme

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["pipeline.yaml", "pipeline-gpu.yaml", "demo.yaml"])
def test_shipped_configs_are_valid(name):
    load_config(REPO / "configs" / name)


def test_the_demo_config_has_a_camera():
    assert load_config(REPO / "configs" / "demo.yaml").cameras


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("yaml_text", "field"),
    [
        ("cameras: [{camera_id: a, url: x.mp4, target_fps: 0}]", "cameras.0.target_fps"),
        ("cameras: [{camera_id: a, url: 'ftp://host/x'}]", "cameras.0.url"),
        ("cameras: [{camera_id: 'bad id', url: x.mp4}]", "cameras.0.camera_id"),
        ("cameras: [{camera_id: a, url: x.mp4, transport: quic}]", "cameras.0.transport"),
        ("cameras: [{camera_id: a, url: x.mp4}, {camera_id: a, url: y.mp4}]", "cameras"),
        ("detector: {score_threshold: 1.5}", "detector.score_threshold"),
        ("detector: {kind: yunet}", "detector"),
        ("events: {redis_url: 'http://x'}", "events.redis_url"),
        ("events: {retry: {initial_s: 5, max_s: 1}}", "events.retry"),
        ("tracker: {ema_alpha: 0}", "tracker.ema_alpha"),
        ("metrics: {prot: 1}", "metrics.prot"),
    ],
)
def test_bad_values_fail_with_the_field_named(tmp_path, yaml_text, field):
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, yaml_text))
    assert f": {field}: " in str(error.value)


def test_unreadable_and_malformed_files_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "cameras: [unclosed"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_defaults_and_overrides(tmp_path):
    config = load_config(write(tmp_path, "cameras: [{camera_id: cam-1, url: rtsp://h/s}]"), overrides={"events": {"maxlen": 5}})
    assert config.cameras[0].transport == "tcp"
    assert config.events.maxlen == 5
    assert config.events.stream_prefix == "ferstream"
    assert not config.cameras[0].is_file


def test_url_scheme():
    assert url_scheme("/videos/a.mp4") == "file"
    assert url_scheme("RTSP://cam/1") == "rtsp"
    assert url_scheme("https://h/live.m3u8") == "https"


def test_models_are_frozen_and_strict():
    source = parse_config(SourceConfig, {"camera_id": "a", "url": "a.mp4"}, "test")
    with pytest.raises(ValidationError):
        source.url = "b.mp4"  # type: ignore[misc]
    with pytest.raises(ConfigError, match="reconect"):
        parse_config(PipelineConfig, {"cameras": [{"camera_id": "a", "url": "a.mp4", "reconect": {}}]}, "test")
    assert BackoffConfig().max_s >= BackoffConfig().initial_s
