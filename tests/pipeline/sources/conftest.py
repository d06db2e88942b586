"""Fixtures of the camera tests: fresh metrics, sources stopped at teardown, no decode thread left behind."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from pipeline.metrics import PipelineMetrics
from pipeline.sources.camera import CameraSource
from tests.pipeline.sources.helpers import source_threads, wait_until


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    yield
    wait_until(lambda: not source_threads(), timeout_s=5.0, what="decode threads to exit")


@pytest.fixture
def metrics() -> PipelineMetrics:
    return PipelineMetrics()


@pytest.fixture
def sources() -> Iterator[list[CameraSource]]:
    """Sources created by a test; stopped at teardown even when the test fails."""
    created: list[CameraSource] = []
    yield created
    for source in created:
        source.stop()
