"""The shipped Serve configs and the deployment settings they carry, without a Ray cluster."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import (
    DeploymentSchema,
    HTTPOptionsSchema,
    RayActorOptionsSchema,
    ServeApplicationSchema,
    ServeDeploySchema,
)

import serve_app.deployments as deployments_module
from pipeline.config import load_config
from pipeline.shutdown import ShutdownBudget, ShutdownReport
from serve_app.app import REPO_ROOT
from serve_app.deployments import (
    INGEST_SHUTDOWN,
    LEASE_FENCE_MARGIN_S,
    LEASE_S,
    RECONCILE_INTERVAL_S,
    RECONCILER_JOIN_S,
    BatchingOptions,
    IngestDeployment,
    IngestOptions,
)
from tests.serve_app.shipped_configs import (
    ALL_DEPLOYMENTS,
    MODEL_DEPLOYMENTS,
    SERVE_CONFIGS,
    application,
    assert_known_keys,
    deployments,
    load_serve_config,
)


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
