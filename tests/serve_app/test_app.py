"""The Serve app without a Ray cluster: the shipped Serve configs, ``build_app`` (it only binds the
deployment graph; nothing here starts Ray), the HTTP request model, and the Ray metrics adapter
(with ``ray.util.metrics`` replaced by fakes, plus one smoke test with the real classes, which
record nowhere without ``ray.init``)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import ray
import yaml
from pydantic import BaseModel, ValidationError
from ray.serve import Application
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import (
    DeploymentSchema,
    HTTPOptionsSchema,
    RayActorOptionsSchema,
    ServeApplicationSchema,
    ServeDeploySchema,
)

import serve_app.deployments as deployments_module
import serve_app.metrics as serve_metrics
from pipeline.config import ConfigError, EventsConfig, PipelineConfig, SourceConfig, load_config
from pipeline.metrics import BATCH_BUCKETS, PipelineMetrics
from pipeline.shutdown import ShutdownBudget, ShutdownReport
from serve_app.api import StreamRequest
from serve_app.app import REPO_ROOT, absolute_file_url, build_app, load_cameras, resolve_path
from serve_app.batching import BusyAwareBatchWait
from serve_app.deployments import (
    CLASSIFIER_BATCHING,
    DETECTOR_BATCHING,
    INGEST_SHUTDOWN,
    LEASE_FENCE_MARGIN_S,
    LEASE_S,
    RECONCILE_INTERVAL_S,
    RECONCILER_JOIN_S,
    BatchingOptions,
    ControllerDeployment,
    ExpressionClassifierDeployment,
    FaceDetectorDeployment,
    IngestDeployment,
    IngestOptions,
    load_pipeline_config,
    reconfigure_batching,
    run_batch,
    submit,
)
from serve_app.live_routes import live_hold_s
from serve_app.metrics import RayMetric, RayMetricFactory

SERVE_CONFIGS = ("configs/serve-cpu.yaml", "configs/serve-gpu.yaml")
MODEL_DEPLOYMENTS = (FaceDetectorDeployment.name, ExpressionClassifierDeployment.name)
ALL_DEPLOYMENTS = {
    deployment.name for deployment in (ControllerDeployment, IngestDeployment, FaceDetectorDeployment, ExpressionClassifierDeployment)
}


def load_serve_config(relative: str) -> dict[str, Any]:
    data = yaml.safe_load((REPO_ROOT / relative).read_text())
    assert isinstance(data, dict)
    return data


def application(config: dict[str, Any]) -> dict[str, Any]:
    (app,) = config["applications"]
    return app


def deployments(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {deployment["name"]: deployment for deployment in application(config)["deployments"]}


def assert_known_keys(data: dict[str, Any], model: type[BaseModel], where: str) -> None:
    # Ray's schemas ignore unknown keys, so a typo ("autoscalling_config") would silently do nothing.
    unknown = set(data) - set(model.model_fields)
    assert not unknown, f"{where}: keys {sorted(unknown)} are unknown to {model.__name__}"


# -- the shipped Serve configs ------------------------------------------------------------------


@pytest.mark.parametrize("relative", SERVE_CONFIGS)
def test_serve_config_validates_with_serves_schema(relative: str) -> None:
    config = load_serve_config(relative)
    schema = ServeDeploySchema.model_validate(config)
    assert [app.import_path for app in schema.applications] == ["serve_app.app:build_app"]

    assert_known_keys(config, ServeDeploySchema, relative)
    assert_known_keys(config.get("http_options", {}), HTTPOptionsSchema, f"{relative}: http_options")
    assert_known_keys(application(config), ServeApplicationSchema, f"{relative}: applications[0]")
    for name, deployment in deployments(config).items():
        assert_known_keys(deployment, DeploymentSchema, f"{relative}: {name}")
        assert_known_keys(deployment.get("ray_actor_options", {}), RayActorOptionsSchema, f"{relative}: {name}.ray_actor_options")
        if "autoscaling_config" in deployment:
            assert_known_keys(deployment["autoscaling_config"], AutoscalingConfig, f"{relative}: {name}.autoscaling_config")


@pytest.mark.parametrize("relative", SERVE_CONFIGS)
def test_serve_config_names_exactly_the_apps_deployments(relative: str) -> None:
    assert set(deployments(load_serve_config(relative))) == ALL_DEPLOYMENTS


@pytest.mark.parametrize("relative", SERVE_CONFIGS)
def test_model_deployments_autoscale_and_can_fill_their_batches(relative: str) -> None:
    config = deployments(load_serve_config(relative))
    for name in MODEL_DEPLOYMENTS:
        deployment = config[name]
        assert "num_replicas" not in deployment, f"{name}: num_replicas and autoscaling_config exclude each other"
        autoscaling = AutoscalingConfig.model_validate(deployment["autoscaling_config"])
        assert 1 <= autoscaling.min_replicas <= autoscaling.max_replicas
        batching = BatchingOptions.model_validate(deployment["user_config"])  # what reconfigure() parses
        assert set(deployment["user_config"]) == {"max_batch_size", "batch_wait_timeout_s"}
        max_ongoing = deployment["max_ongoing_requests"]
        assert max_ongoing >= batching.max_batch_size, f"{name}: a replica never holds enough requests to fill a batch"
        assert autoscaling.target_ongoing_requests <= max_ongoing, f"{name}: the autoscaling target is above what a replica accepts"


@pytest.mark.parametrize("relative", SERVE_CONFIGS)
def test_ingest_user_config_is_valid(relative: str) -> None:
    ingest = deployments(load_serve_config(relative))["Ingest"]
    IngestOptions.model_validate(ingest["user_config"])
    assert "autoscaling_config" not in ingest  # it serves no requests: request-based autoscaling cannot see its load


@pytest.mark.parametrize("relative", SERVE_CONFIGS)
def test_ingest_shutdown_fits_in_the_grace_period_the_config_sets(relative: str) -> None:
    config = load_serve_config(relative)
    ingest = deployments(config)["Ingest"]
    # Explicit: Serve's default would change with Ray's version, and a kill mid-flush loses the outage buffer.
    assert "graceful_shutdown_timeout_s" in ingest, f"{relative}: Ingest must set graceful_shutdown_timeout_s"
    schema = DeploymentSchema.model_validate(ingest)
    pipeline = load_config(REPO_ROOT / application(config)["args"]["pipeline_config"])
    # Serve first waits for requests in flight (describe() calls) for up to graceful_shutdown_wait_loop_s, then runs __del__.
    wait_loop_s = ingest.get("graceful_shutdown_wait_loop_s", 2.0)
    shutdown_s = wait_loop_s + RECONCILER_JOIN_S + INGEST_SHUTDOWN.bound_s(pipeline.events.socket_timeout_s)
    assert shutdown_s < schema.graceful_shutdown_timeout_s, f"{relative}: shutdown takes up to {shutdown_s:g}s"
    assert INGEST_SHUTDOWN.flush_s < schema.graceful_shutdown_timeout_s


def test_the_lease_fence_leaves_renewals_room_and_stops_cameras_before_expiry() -> None:
    assert 0 < LEASE_FENCE_MARGIN_S < LEASE_S
    assert (LEASE_S - LEASE_FENCE_MARGIN_S) / RECONCILE_INTERVAL_S >= 5  # a few failed renewals before a camera stops


def test_ingest_shutdown_hook_stops_the_reconciler_then_shuts_the_worker_down_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, ...]] = []
    report = ShutdownReport(still_stopping=[], undelivered=0, released=["a"], duration_s=0.1)

    def record(shard: Any, publisher: Any, budget: ShutdownBudget) -> ShutdownReport:
        calls.append((shard, publisher, budget, replica._reconciler.is_alive()))
        return report

    monkeypatch.setattr(deployments_module, "shut_down_worker", record)
    replica = object.__new__(IngestDeployment.func_or_class)  # no Ray: only the hook's wiring is under test
    replica._stop = threading.Event()
    replica._reconciler = threading.Thread(target=lambda: replica._stop.wait(30))
    replica._reconciler.start()
    replica.shard, replica.publisher = object(), object()
    replica.__del__()
    replica.__del__()  # the garbage collector's call after Serve's
    assert calls == [(replica.shard, replica.publisher, INGEST_SHUTDOWN, False)]
    assert replica.shutdown_report is report


def test_gpu_config_puts_the_models_on_gpus() -> None:
    config = load_serve_config("configs/serve-gpu.yaml")
    for name in MODEL_DEPLOYMENTS:
        assert deployments(config)[name]["ray_actor_options"].get("num_gpus", 0) > 0, name
    pipeline = load_config(REPO_ROOT / application(config)["args"]["pipeline_config"])
    assert pipeline.detector.device == "cuda" and pipeline.classifier.device == "cuda"


def test_cpu_config_asks_for_no_gpu() -> None:
    config = load_serve_config("configs/serve-cpu.yaml")
    for name, deployment in deployments(config).items():
        assert not deployment.get("ray_actor_options", {}).get("num_gpus"), name
    pipeline = load_config(REPO_ROOT / application(config)["args"]["pipeline_config"])
    assert pipeline.detector.device == "cpu" and pipeline.classifier.device == "cpu"


# -- build_app ------------------------------------------------------------------------------------


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


def test_stream_request_maps_to_a_source_config() -> None:
    request = StreamRequest(
        camera_id="lobby",
        url="rtsp://cam/stream",
        target_fps=2.5,
        transport="udp",
        loop=True,
        options={"watchdog_timeout_s": 3, "reconnect": {"initial_s": 0.2, "max_s": 1}},
    )
    camera = request.to_source_config()
    assert (camera.camera_id, camera.url, camera.target_fps, camera.transport, camera.loop) == (
        "lobby",
        "rtsp://cam/stream",
        2.5,
        "udp",
        True,
    )
    assert camera.watchdog_timeout_s == 3 and camera.reconnect.initial_s == 0.2 and camera.reconnect.max_s == 1


def test_stream_request_defaults_are_source_configs() -> None:
    camera = StreamRequest(camera_id="lobby", url="rtsp://cam/stream").to_source_config()
    assert camera == SourceConfig(camera_id="lobby", url="rtsp://cam/stream")
    # The API's documented default rate (README: 5 frames a second) is SourceConfig's.
    assert camera.target_fps == 5.0 and (camera.transport, camera.loop) == ("tcp", False)
    assert StreamRequest(camera_id="all", url="rtsp://cam/stream", target_fps=None).to_source_config().target_fps is None


def test_stream_request_top_level_fields_are_source_config_fields() -> None:
    top_level = set(StreamRequest.model_fields) - {"options"}
    for name in top_level:
        request_field, source_field = StreamRequest.model_fields[name], SourceConfig.model_fields[name]
        assert request_field.annotation == source_field.annotation, name
        assert request_field.get_default() == source_field.get_default(), name
        assert request_field.metadata == source_field.metadata, name


def test_stream_request_accepts_the_old_names_for_one_release() -> None:
    camera = StreamRequest.model_validate({"id": "lobby", "url": "rtsp://cam/stream", "fps": 2}).to_source_config()
    assert (camera.camera_id, camera.target_fps) == ("lobby", 2)


@pytest.mark.parametrize("body", [{"id": "a", "camera_id": "a"}, {"camera_id": "a", "fps": 1, "target_fps": 1}])
def test_stream_request_refuses_a_field_under_both_names(body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="both given"):
        StreamRequest.model_validate({"url": "rtsp://cam/stream", **body})


def test_the_preview_is_off_unless_a_stream_asks_for_it() -> None:
    assert StreamRequest(camera_id="lobby", url="rtsp://cam/stream").to_source_config().preview is False
    assert StreamRequest(camera_id="lobby", url="rtsp://cam/stream", options={"preview": True}).to_source_config().preview is True


def test_one_event_speaks_for_a_frame_interval_or_for_a_heartbeat_on_the_live_page() -> None:
    assert live_hold_s(EventsConfig()) == 1.0
    assert live_hold_s(EventsConfig(policy="on_change", heartbeat_s=5.0)) == 6.0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"target_fps": -1}, "target_fps"),
        ({"fps": 0}, "fps"),  # the error names the field as it was sent
        ({"transport": "sctp"}, "transport"),
        ({"camera_id": "has space"}, "camera_id"),
    ],
)
def test_a_bad_top_level_field_is_refused_by_the_request_model(body: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as raised:
        StreamRequest.model_validate({"camera_id": "lobby", "url": "rtsp://cam/stream", **body})
    assert [problem["loc"] for problem in raised.value.errors()] == [(field,)]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"url": "ftp://host/video"}, "url"),
        ({"options": {"nonsense": 1}}, "nonsense"),
        ({"options": {"reconnect": {"initial_s": -1}}}, "reconnect.initial_s"),
    ],
)
def test_a_bad_stream_request_names_the_field(body: dict[str, Any], field: str) -> None:
    request = StreamRequest.model_validate({"camera_id": "lobby", "url": "rtsp://cam/stream", **body})
    with pytest.raises(ConfigError) as raised:
        request.to_source_config()
    assert f"stream: {field}:" in str(raised.value)


def test_stream_request_rejects_unknown_top_level_fields() -> None:
    with pytest.raises(ValidationError):
        StreamRequest.model_validate({"camera_id": "lobby", "url": "rtsp://cam/stream", "max_fps": 2})


# -- batching user_config -------------------------------------------------------------------------


class FakeBatchMethod:
    def __init__(self) -> None:
        self.calls: list[tuple[str, float]] = []

    def set_max_batch_size(self, value: int) -> None:
        self.calls.append(("max_batch_size", value))

    def set_batch_wait_timeout_s(self, value: float) -> None:
        self.calls.append(("batch_wait_timeout_s", value))


def test_reconfigure_batching_sets_both_options() -> None:
    method, batch_wait = FakeBatchMethod(), BusyAwareBatchWait(0.5)
    reconfigure_batching(method, batch_wait, {"max_batch_size": 32}, "FaceDetector", DETECTOR_BATCHING)
    assert method.calls == [("max_batch_size", 32), ("batch_wait_timeout_s", 0.01)]
    assert batch_wait.base_wait_s == 0.01  # the idle wait follows user_config too


def test_a_key_left_out_of_user_config_keeps_that_deployments_default() -> None:
    # The classifier's wait is 0.005 s: a user_config giving only max_batch_size must not get the detector's 0.01 s.
    method, batch_wait = FakeBatchMethod(), BusyAwareBatchWait(0.5)
    reconfigure_batching(method, batch_wait, {"max_batch_size": 128}, "ExpressionClassifier", CLASSIFIER_BATCHING)
    assert method.calls == [("max_batch_size", 128), ("batch_wait_timeout_s", CLASSIFIER_BATCHING.batch_wait_timeout_s)]
    assert CLASSIFIER_BATCHING.batch_wait_timeout_s != DETECTOR_BATCHING.batch_wait_timeout_s


@pytest.mark.parametrize(
    ("method", "defaults"),
    [
        (FaceDetectorDeployment.func_or_class.detect_batch, DETECTOR_BATCHING),
        (ExpressionClassifierDeployment.func_or_class.classify_batch, CLASSIFIER_BATCHING),
    ],
)
def test_the_serve_batch_decorators_start_from_the_deployments_defaults(method: Any, defaults: BatchingOptions) -> None:
    # Ray's batch wrapper has no public getters; these private ones read what @serve.batch was given.
    assert (method._get_max_batch_size(), method._get_batch_wait_timeout_s()) == (defaults.max_batch_size, defaults.batch_wait_timeout_s)


def test_the_cpu_serve_config_states_the_deployments_defaults() -> None:
    config = deployments(load_serve_config("configs/serve-cpu.yaml"))
    assert BatchingOptions.model_validate(config["FaceDetector"]["user_config"]) == DETECTOR_BATCHING
    assert BatchingOptions.model_validate(config["ExpressionClassifier"]["user_config"]) == CLASSIFIER_BATCHING


def test_the_gpu_serve_config_batches_more_than_the_cpu_defaults() -> None:
    config = deployments(load_serve_config("configs/serve-gpu.yaml"))
    for name, defaults in (("FaceDetector", DETECTOR_BATCHING), ("ExpressionClassifier", CLASSIFIER_BATCHING)):
        gpu = BatchingOptions.model_validate(config[name]["user_config"])
        assert gpu.max_batch_size > defaults.max_batch_size and gpu.batch_wait_timeout_s == defaults.batch_wait_timeout_s, name


@pytest.mark.parametrize("user_config", [{"max_batch_size": 0}, {"batch_wait_timeout_s": -1}, {"max_batch": 8}])
def test_reconfigure_batching_rejects_bad_user_config(user_config: dict[str, Any]) -> None:
    method, batch_wait = FakeBatchMethod(), BusyAwareBatchWait(0.5)
    with pytest.raises(ConfigError, match=r"FaceDetector\.user_config: "):
        reconfigure_batching(method, batch_wait, user_config, "FaceDetector", DETECTOR_BATCHING)
    assert method.calls == [] and batch_wait.base_wait_s == 0.5


class FakeBatchedCall(FakeBatchMethod):
    """A ``@serve.batch`` method that runs every item as its own batch through ``run_batch``."""

    def __init__(self, model_call: Any, batch_wait: BusyAwareBatchWait, metrics: PipelineMetrics) -> None:
        super().__init__()
        self.model_call, self.batch_wait, self.metrics = model_call, batch_wait, metrics

    async def __call__(self, item: np.ndarray) -> Any:
        return (await run_batch(self.model_call, [item], self.batch_wait, self.metrics, "detect"))[0]


def test_submit_waits_for_the_running_call_and_run_batch_records_it() -> None:
    import asyncio

    release = threading.Event()

    def slow_model(items: list[np.ndarray]) -> list[int]:
        release.wait(5)
        return [int(item.sum()) for item in items]

    batch_wait = BusyAwareBatchWait(0.002)
    batch_wait.finished(1, 0.4)  # a call on one item has taken 0.4 s
    metrics = PipelineMetrics()
    method = FakeBatchedCall(slow_model, batch_wait, metrics)

    async def scenario() -> tuple[int, int]:
        first = asyncio.create_task(submit(method, batch_wait, np.ones((2, 2))))
        await asyncio.sleep(0.05)  # the model is now busy with the first item
        second = asyncio.create_task(submit(method, batch_wait, np.ones((3, 3))))
        await asyncio.sleep(0.05)
        release.set()
        return await first, await second

    assert asyncio.run(scenario()) == (4, 9)
    idle_wait, busy_wait = method.calls[0][1], method.calls[1][1]
    assert idle_wait == pytest.approx(0.002)  # an idle model: the configured wait only
    assert 0.3 < busy_wait < 0.402  # the second item's batch waits for the rest of the running call
    assert batch_wait.wait_timeout(time.perf_counter()) == pytest.approx(0.002)  # idle again afterwards
    assert batch_wait.expected_duration(1) > 0.05  # the measured calls updated the average


# -- the Ray metrics adapter ------------------------------------------------------------------------


class FakeRayMetric:
    """Mimics ``ray.util.metrics``: tag_keys a tuple, every tag given on each call, counters > 0."""

    kind = ""

    def __init__(self, name: str, description: str = "", boundaries: Sequence[float] | None = None, tag_keys: tuple[str, ...] = ()) -> None:
        assert isinstance(tag_keys, tuple)
        self.name, self.description, self.boundaries, self.tag_keys = name, description, boundaries, tag_keys
        self.calls: list[tuple[str, float, dict[str, str]]] = []

    def _record(self, method: str, value: float, tags: dict[str, str] | None) -> None:
        tags = tags or {}
        assert set(tags) == set(self.tag_keys), f"{self.name}: tags {tags} for tag_keys {self.tag_keys}"
        self.calls.append((method, value, dict(tags)))


class FakeCounter(FakeRayMetric):
    kind = "counter"

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        if value <= 0:
            raise ValueError(f"value must be >0, got {value}")  # as ray.util.metrics.Counter
        self._record("inc", value, tags)


class FakeGauge(FakeRayMetric):
    kind = "gauge"

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        self._record("set", value, tags)


class FakeHistogram(FakeRayMetric):
    kind = "histogram"

    def __init__(self, name: str, description: str = "", boundaries: Sequence[float] | None = None, tag_keys: tuple[str, ...] = ()) -> None:
        assert boundaries and all(boundary > 0 for boundary in boundaries)
        super().__init__(name, description, boundaries, tag_keys)

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        self._record("observe", value, tags)


@pytest.fixture
def created(monkeypatch: pytest.MonkeyPatch) -> list[FakeRayMetric]:
    """Replace ``ray.util.metrics`` in serve_app.metrics; returns every fake metric created."""
    metrics: list[FakeRayMetric] = []

    def recording(cls: type[FakeRayMetric]) -> Any:
        def create(*args: Any, **kwargs: Any) -> FakeRayMetric:
            metric = cls(*args, **kwargs)
            metrics.append(metric)
            return metric

        return create

    fakes = SimpleNamespace(Counter=recording(FakeCounter), Gauge=recording(FakeGauge), Histogram=recording(FakeHistogram))
    monkeypatch.setattr(serve_metrics, "ray_metrics", fakes)
    return metrics


def test_factory_names_and_declares_each_family(created: list[FakeRayMetric]) -> None:
    factory = RayMetricFactory()
    factory.counter("frames_decoded", "Frames decoded", ["camera"])
    factory.gauge("events_buffered", "Events held", [])
    factory.histogram("batch_size", "Items per batch", ["stage"], (1, 2, 4))
    counter, gauge, histogram = created
    assert (counter.kind, counter.name, counter.description, counter.tag_keys) == (
        "counter",
        "ferstream_frames_decoded",
        "Frames decoded",
        ("camera",),
    )
    assert (gauge.kind, gauge.name, gauge.tag_keys) == ("gauge", "ferstream_events_buffered", ())
    assert (histogram.kind, histogram.name, histogram.tag_keys, histogram.boundaries) == (
        "histogram",
        "ferstream_batch_size",
        ("stage",),
        [1.0, 2.0, 4.0],
    )
    assert all(isinstance(boundary, float) for boundary in histogram.boundaries or [])
    RayMetricFactory(namespace="other").counter("x", "", [])
    assert created[-1].name == "other_x"


def test_counter_children_pass_tags_and_skip_non_positive_increments(created: list[FakeRayMetric]) -> None:
    family = RayMetricFactory().counter("frames_dropped", "", ["camera", "reason"])
    assert isinstance(family, RayMetric)
    (metric,) = created
    child = family.labels(camera="lobby", reason="stale")
    child.inc(0)  # prometheus-client's no-op; Ray would raise
    child.inc(-1)
    assert metric.calls == []
    child.inc()
    child.inc(3)
    family.labels(reason="fps_limit", camera="door").inc(2)
    assert metric.calls == [
        ("inc", 1.0, {"camera": "lobby", "reason": "stale"}),
        ("inc", 3, {"camera": "lobby", "reason": "stale"}),
        ("inc", 2, {"camera": "door", "reason": "fps_limit"}),
    ]


def test_children_are_cached_per_label_values(created: list[FakeRayMetric]) -> None:
    family = RayMetricFactory().counter("classifications", "", ["camera", "emotion"])
    child = family.labels(camera="lobby", emotion="happy")
    assert family.labels(emotion="happy", camera="lobby") is child
    assert family.labels(camera="lobby", emotion="sad") is not child
    assert family.labels(camera=7, emotion="happy") is family.labels(camera="7", emotion="happy")  # type: ignore[arg-type]
    family.labels(camera=7, emotion="happy").inc()  # type: ignore[arg-type]
    assert created[0].calls == [("inc", 1.0, {"camera": "7", "emotion": "happy"})]


def test_a_missing_label_is_an_error(created: list[FakeRayMetric]) -> None:
    family = RayMetricFactory().counter("frames_dropped", "", ["camera", "reason"])
    with pytest.raises((KeyError, ValueError)):
        family.labels(camera="lobby")


def test_gauges_and_histograms_pass_tags(created: list[FakeRayMetric]) -> None:
    factory = RayMetricFactory()
    up = factory.gauge("stream_up", "", ["camera"])
    latency = factory.histogram("stage_latency_seconds", "", ["stage"], (0.01, 0.1))
    up.labels(camera="lobby").set(1)
    up.labels(camera="lobby").set(0)
    latency.labels(stage="detect").observe(0.05)
    gauge, histogram = created
    assert gauge.calls == [("set", 1, {"camera": "lobby"}), ("set", 0, {"camera": "lobby"})]
    assert histogram.calls == [("observe", 0.05, {"stage": "detect"})]


def test_label_less_families_record_without_tags(created: list[FakeRayMetric]) -> None:
    factory = RayMetricFactory()
    buffered = factory.gauge("events_buffered", "", [])
    errors = factory.counter("redis_errors", "", [])
    buffered.set(12)
    errors.inc(0)
    errors.inc()
    gauge, counter = created
    assert gauge.calls == [("set", 12, {})]
    assert counter.calls == [("inc", 1.0, {})]


def prometheus_families() -> dict[str, str]:
    """name -> type of every PipelineMetrics family, from the prometheus-client registry."""
    return {family.name: family.type for family in PipelineMetrics().registry.collect()}


def test_pipeline_metrics_map_every_family_onto_ray(created: list[FakeRayMetric]) -> None:
    metrics = PipelineMetrics(RayMetricFactory())
    assert {metric.name: metric.kind for metric in created} == prometheus_families()
    assert len(created) == len(prometheus_families())
    batch_size = next(metric for metric in created if metric.name == "ferstream_batch_size")
    assert batch_size.boundaries == [float(bucket) for bucket in BATCH_BUCKETS]
    with pytest.raises(TypeError):
        _ = metrics.registry  # no prometheus-client registry behind Ray's metrics

    # Every family records through its fake, with the tags its declaration promised.
    metrics.frames_decoded.labels(camera="lobby").inc()
    metrics.frames_dropped.labels(camera="lobby", reason="stale").inc(0)
    metrics.classifications.labels(camera="lobby", emotion="happy").inc()
    metrics.end_to_end_latency.labels(camera="lobby").observe(0.3)
    metrics.events_buffered.set(4)
    metrics.redis_errors.inc()
    metrics.forget_camera("lobby")
    recorded = {metric.name: metric.calls for metric in created if metric.calls}
    assert recorded == {
        "ferstream_frames_decoded": [("inc", 1.0, {"camera": "lobby"})],
        "ferstream_classifications": [("inc", 1.0, {"camera": "lobby", "emotion": "happy"})],
        "ferstream_end_to_end_latency_seconds": [("observe", 0.3, {"camera": "lobby"})],
        "ferstream_events_buffered": [("set", 4, {})],
        "ferstream_redis_errors": [("inc", 1.0, {})],
        "ferstream_stream_up": [("set", 0, {"camera": "lobby"})],
    }


def test_pipeline_metrics_construct_with_the_real_ray_classes() -> None:
    # ray.util.metrics validates tag keys and boundaries when a metric is created and tags when it
    # records; without ray.init nothing is exported, so this checks the declarations only.
    metrics = PipelineMetrics(RayMetricFactory())
    metrics.frames_decoded.labels(camera="lobby").inc()
    metrics.decode_errors.labels(camera="lobby", kind="open").inc(0)
    metrics.batch_size.labels(stage="detect").observe(8)
    metrics.stream_up.labels(camera="lobby").set(1)
    metrics.events_buffered.set(0)


def test_stream_request_options_cannot_override_the_top_level_fields() -> None:
    request = StreamRequest(camera_id="door", url="rtsp://cam/1", options={"url": "rtsp://other/2", "loop": True})
    with pytest.raises(ConfigError, match="loop, url must be given as the top-level field"):
        request.to_source_config()


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


@pytest.mark.parametrize("user_config", [{"batch_wait_timeout_s": float("inf")}, {"batch_wait_timeout_s": float("nan")}])
def test_batching_options_refuse_non_finite_numbers(user_config: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=r"FaceDetector\.user_config: batch_wait_timeout_s: .*finite"):
        reconfigure_batching(FakeBatchMethod(), BusyAwareBatchWait(0.5), user_config, "FaceDetector", DETECTOR_BATCHING)


def test_build_app_applies_previews_none_to_the_cameras_file_too(tmp_path: Path) -> None:
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({"previews": "none"}))
    cameras_file = tmp_path / "cameras.yaml"
    cameras_file.write_text(yaml.safe_dump([{"camera_id": "door", "url": "rtsp://h/a", "preview": True}]))
    message = config_error({"pipeline_config": str(pipeline), "cameras_file": str(cameras_file)})
    assert "preview" in message and "'door'" in message and "previews: none" in message
