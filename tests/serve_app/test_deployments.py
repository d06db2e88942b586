"""A camera session on an ingest replica builds its CameraAnalyzer with the pipeline config's priors and abstaining."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np
import pytest

from pipeline.config import ConfigError, PipelineConfig, SourceConfig, parse_config
from pipeline.events import EventPublisher
from pipeline.isolation import FrameFailures
from pipeline.metrics import PipelineMetrics
from pipeline.priors import FixedPriorShift
from serve_app.batching import BusyAwareBatchWait
from serve_app.deployments import (
    CLASSIFIER_BATCHING,
    DETECTOR_BATCHING,
    BatchingOptions,
    CameraSession,
    ExpressionClassifierDeployment,
    FaceDetectorDeployment,
    reconfigure_batching,
    run_batch,
    submit,
)
from tests.pipeline.conftest import make_metadata
from tests.pipeline.events.helpers import MemorySink
from tests.serve_app.shipped_configs import deployments, load_serve_config

log = logging.getLogger("test.serve_deployments")
CAMERA = SourceConfig(camera_id="cam1", url="rtsp://127.0.0.1:9/none")


def session_for(config: PipelineConfig) -> CameraSession:
    metrics = PipelineMetrics()
    publisher = EventPublisher(config.events, metrics, MemorySink())
    # The model handles are not called while the session is built.
    return CameraSession(CAMERA, config, make_metadata(), None, None, publisher, metrics, FrameFailures(metrics, log))  # type: ignore[arg-type]


def test_a_session_applies_the_configured_prior_and_abstaining() -> None:
    classes = make_metadata().classes
    weights = {name: 1.0 for name in classes}
    config = parse_config(
        PipelineConfig, {"priors": {"deployment_prior": weights, "train_prior": weights}, "events": {"abstain_below": 0.35}}, "test"
    )
    session = session_for(config)
    assert isinstance(session.analyzer.prior_adjuster, FixedPriorShift) and session.analyzer.abstain_below == 0.35
    default = session_for(PipelineConfig())
    assert default.analyzer.prior_adjuster is None and default.analyzer.abstain_below is None


def test_a_prior_that_does_not_fit_the_model_fails_naming_the_field() -> None:
    config = parse_config(PipelineConfig, {"priors": {"deployment_prior": {"nobody": 1.0}, "train_prior": {"nobody": 1.0}}}, "test")
    with pytest.raises(ConfigError, match=r"^priors\.train_prior: missing"):
        session_for(config)


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


@pytest.mark.parametrize("user_config", [{"batch_wait_timeout_s": float("inf")}, {"batch_wait_timeout_s": float("nan")}])
def test_batching_options_refuse_non_finite_numbers(user_config: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=r"FaceDetector\.user_config: batch_wait_timeout_s: .*finite"):
        reconfigure_batching(FakeBatchMethod(), BusyAwareBatchWait(0.5), user_config, "FaceDetector", DETECTOR_BATCHING)
