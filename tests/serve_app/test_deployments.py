"""A camera session on an ingest replica builds its CameraAnalyzer with the pipeline config's priors and abstaining."""

from __future__ import annotations

import logging

import pytest

from pipeline.config import ConfigError, PipelineConfig, SourceConfig, parse_config
from pipeline.events import EventPublisher
from pipeline.isolation import FrameFailures
from pipeline.metrics import PipelineMetrics
from pipeline.priors import FixedPriorShift
from serve_app.deployments import CameraSession
from tests.pipeline.conftest import make_metadata
from tests.pipeline.events.helpers import MemorySink

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
