"""``build_app`` without a Ray cluster: it only binds the deployment graph; nothing here starts Ray."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from ray.serve import Application

from pipeline.config import ConfigError, PipelineConfig, SourceConfig, load_config
from serve_app.app import REPO_ROOT, absolute_file_url, build_app, load_cameras, resolve_path
from serve_app.deployments import (
    load_pipeline_config,
)
from tests.serve_app.shipped_configs import application, load_serve_config


def bound_args(app: Application) -> tuple[Any, ...]:
    # Application has no public accessor for its bound arguments; this is the private one.
    return tuple(app._bound_deployment.init_args)


def test_build_app_binds_the_graph_for_the_shipped_args_without_starting_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_ray_init(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("build_app must only bind the graph; Serve starts the replicas")

    monkeypatch.setattr(ray, "init", no_ray_init)  # ray's auto-init goes through ray.init too
    args = application(load_serve_config("configs/serve-cpu.yaml"))["args"]
    initialized = ray.is_initialized()
    app = build_app(args)
    assert ray.is_initialized() == initialized

    assert isinstance(app, Application)
    config, cameras, ingest = bound_args(app)
    assert app._bound_deployment.name == "Controller"
    assert PipelineConfig.model_validate(config) == load_config(REPO_ROOT / args["pipeline_config"])
    (demo,) = cameras  # configs/cameras.yaml, with its relative file path pinned down
    assert demo["camera_id"] == "demo" and Path(demo["url"]).is_absolute()
    assert SourceConfig.model_validate(demo).loop is True

    assert isinstance(ingest, Application) and ingest._bound_deployment.name == "Ingest"
    ingest_config, detector, classifier = bound_args(ingest)
    assert ingest_config == config
    assert [detector._bound_deployment.name, classifier._bound_deployment.name] == ["FaceDetector", "ExpressionClassifier"]


def test_build_app_for_the_gpu_args(tmp_path: Path) -> None:
    args = dict(application(load_serve_config("configs/serve-gpu.yaml"))["args"])
    # The cameras file is the ConfigMap mounted in the Ray pods; an empty one stands in for it here.
    (tmp_path / "cameras.yaml").write_text("[]\n")
    args["cameras_file"] = str(tmp_path / "cameras.yaml")
    config, cameras, _ingest = bound_args(build_app(args))
    assert cameras == [] and config["detector"]["device"] == "cuda"


def test_build_app_defaults_and_other_working_directories(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # `serve run` may start anywhere: relative args fall back to the repository
    assert resolve_path("configs/pipeline.yaml") == REPO_ROOT / "configs/pipeline.yaml"
    for args in ({}, {"pipeline_config": "configs/pipeline.yaml", "cameras_file": None}):
        _config, cameras, _ingest = bound_args(build_app(args))
        assert cameras == []


def all_bound_args(app: Application) -> list[Any]:
    """The bound arguments of every deployment in the graph below ``app``."""
    found: list[Any] = []
    for arg in bound_args(app):
        found.extend(all_bound_args(arg) if isinstance(arg, Application) else [arg])
    return found


@pytest.mark.parametrize(
    ("events", "field"),
    [({"password": "s3cret-pw"}, "events.password"), ({"redis_url": "redis://:s3cret-pw@cache:6379/0"}, "events.redis_url")],
)
def test_build_app_refuses_a_redis_secret_in_the_pipeline_config(tmp_path: Path, events: dict[str, str], field: str) -> None:
    # Bound arguments live in Ray's cluster state (GCS, dashboard): no secret may go there.
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({"events": events}))
    with pytest.raises(ConfigError) as raised:
        build_app({"pipeline_config": str(pipeline)})
    message = str(raised.value)
    assert f"{pipeline}: {field}: " in message and "FERSTREAM_REDIS_PASSWORD" in message
    assert "s3cret-pw" not in message


def test_the_redis_secret_reaches_the_replicas_from_their_environment_not_the_app_args(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FERSTREAM_REDIS_URL", "redis://:url-s3cret@cache:6379/0")
    monkeypatch.setenv("FERSTREAM_REDIS_PASSWORD", "env-s3cret")
    app = build_app({"pipeline_config": "configs/pipeline.yaml"})
    arguments = json.dumps(all_bound_args(app))
    assert "s3cret" not in arguments
    config, _cameras, _ingest = bound_args(app)
    assert config["events"]["password"] is None
    # What each replica does with its bound config: its own environment adds the secrets.
    replica = load_pipeline_config(config, "Ingest")
    assert replica.events.password_value == "env-s3cret" and replica.events.redis_url == "redis://:url-s3cret@cache:6379/0"


def test_build_app_merges_config_cameras_and_the_cameras_file(tmp_path: Path) -> None:
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({"cameras": [{"camera_id": "a", "url": "rtsp://h/a"}]}))
    cameras_file = tmp_path / "cameras.yaml"
    cameras_file.write_text(yaml.safe_dump([{"camera_id": "b", "url": "rtsp://h/b", "target_fps": 2}]))
    _config, cameras, _ingest = bound_args(build_app({"pipeline_config": str(pipeline), "cameras_file": str(cameras_file)}))
    assert [(camera["camera_id"], camera["target_fps"]) for camera in cameras] == [("a", 5.0), ("b", 2.0)]


def config_error(args: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as raised:
        build_app(args)
    return str(raised.value)


def test_build_app_rejects_unknown_args() -> None:
    message = config_error({"pipeline_config": "configs/pipeline.yaml", "camera_file": "configs/cameras.yaml"})
    assert "application args" in message and "camera_file" in message


def test_build_app_rejects_a_missing_pipeline_config() -> None:
    message = config_error({"pipeline_config": "configs/no-such-pipeline.yaml"})
    assert "no-such-pipeline.yaml" in message and "cannot read config" in message


def test_build_app_rejects_an_invalid_pipeline_config(tmp_path: Path) -> None:
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({"detector": {"kind": "haar"}}))
    message = config_error({"pipeline_config": str(pipeline)})
    assert "detector: " in message and "'kind'" in message and "'haar'" in message


def test_build_app_rejects_a_missing_cameras_file(tmp_path: Path) -> None:
    message = config_error({"cameras_file": str(tmp_path / "cameras.yaml")})
    assert "cameras.yaml" in message and "cannot read config" in message


def test_build_app_rejects_a_cameras_file_that_is_not_a_list(tmp_path: Path) -> None:
    cameras_file = tmp_path / "cameras.yaml"
    cameras_file.write_text(yaml.safe_dump({"camera_id": "a", "url": "rtsp://h/a"}))
    message = config_error({"cameras_file": str(cameras_file)})
    assert "cameras.yaml" in message and "YAML list" in message


def test_build_app_names_the_bad_camera_in_the_cameras_file(tmp_path: Path) -> None:
    cameras_file = tmp_path / "cameras.yaml"
    cameras_file.write_text(yaml.safe_dump([{"camera_id": "ok", "url": "rtsp://h/ok"}, {"camera_id": "bad", "url": "ftp://h/v"}]))
    message = config_error({"cameras_file": str(cameras_file)})
    assert "cameras.yaml[1]: url:" in message and "unsupported URL scheme" in message

    cameras_file.write_text(yaml.safe_dump([{"camera_id": "bad", "url": "ftp://h/v"}]))
    assert "cameras.yaml[0]: url:" in config_error({"cameras_file": str(cameras_file)})


def test_load_cameras_reads_an_empty_file_as_no_cameras(tmp_path: Path) -> None:
    cameras_file = tmp_path / "cameras.yaml"
    cameras_file.write_text("# none yet\n")
    assert load_cameras(cameras_file) == []


# -- absolute_file_url ----------------------------------------------------------------------------


def test_absolute_file_url_pins_relative_paths_to_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "clip.mp4").write_bytes(b"")
    camera = SourceConfig(camera_id="a", url="clip.mp4", loop=True, target_fps=2)
    pinned = absolute_file_url(camera)
    assert pinned.url == str(tmp_path.resolve() / "clip.mp4")
    assert pinned.model_dump(exclude={"url"}) == camera.model_dump(exclude={"url"})
    assert camera.url == "clip.mp4"  # a copy: the original is frozen and untouched


def test_absolute_file_url_falls_back_to_the_repository(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    pinned = absolute_file_url(SourceConfig(camera_id="a", url="media/not-here.mp4"))
    assert pinned.url == str((REPO_ROOT / "media/not-here.mp4").resolve())
    assert absolute_file_url(SourceConfig(camera_id="a", url="../shared/x.mp4")).url == str((REPO_ROOT / "../shared/x.mp4").resolve())


@pytest.mark.parametrize("url", ["/abs/clip.mp4", "file:///abs/clip.mp4", "rtsp://cam/stream", "https://host/clip.mp4"])
def test_absolute_file_url_leaves_absolute_paths_and_urls_alone(url: str) -> None:
    camera = SourceConfig(camera_id="a", url=url)
    assert absolute_file_url(camera) == camera


# -- StreamRequest --------------------------------------------------------------------------------


def test_build_app_rejects_a_camera_id_defined_twice(tmp_path: Path) -> None:
    cameras = tmp_path / "cameras.yaml"
    cameras.write_text("- {camera_id: door, url: rtsp://a/1}\n- {camera_id: door, url: rtsp://b/2}\n")
    with pytest.raises(ConfigError, match="camera_id 'door' is defined twice"):
        build_app({"pipeline_config": "configs/pipeline.yaml", "cameras_file": str(cameras)})


def test_build_app_applies_the_url_policy_to_the_cameras_file(tmp_path: Path) -> None:
    cameras = tmp_path / "cameras.yaml"
    cameras.write_text("- {camera_id: meta, url: 'http://169.254.169.254/latest/'}\n")
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text("{}\n")
    with pytest.raises(ConfigError, match="camera 'meta': url: link-local"):
        build_app({"pipeline_config": str(pipeline), "cameras_file": str(cameras)})
    pipeline.write_text("url_policy: {allow_link_local: true}\n")
    _config, bound, _ingest = bound_args(build_app({"pipeline_config": str(pipeline), "cameras_file": str(cameras)}))
    assert [camera["camera_id"] for camera in bound] == ["meta"]


def test_build_app_refuses_more_cameras_than_max_cameras(tmp_path: Path) -> None:
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({"max_cameras": 2, "cameras": [{"camera_id": "a", "url": "rtsp://h/a"}]}))
    cameras = tmp_path / "cameras.yaml"
    cameras.write_text(yaml.safe_dump([{"camera_id": "b", "url": "rtsp://h/b"}, {"camera_id": "c", "url": "rtsp://h/c"}]))
    with pytest.raises(ConfigError, match=r"3 cameras \(pipeline_config and cameras_file\), more than max_cameras \(2\)"):
        build_app({"pipeline_config": str(pipeline), "cameras_file": str(cameras)})


def test_build_app_applies_previews_none_to_the_cameras_file_too(tmp_path: Path) -> None:
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({"previews": "none"}))
    cameras_file = tmp_path / "cameras.yaml"
    cameras_file.write_text(yaml.safe_dump([{"camera_id": "door", "url": "rtsp://h/a", "preview": True}]))
    message = config_error({"pipeline_config": str(pipeline), "cameras_file": str(cameras_file)})
    assert "preview" in message and "'door'" in message and "previews: none" in message
