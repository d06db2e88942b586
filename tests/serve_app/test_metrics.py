"""The Ray metrics adapter forgets a removed camera's series (under Serve, ``forget_camera`` goes through it)."""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import pytest

import serve_app.metrics as serve_metrics
from pipeline.metrics import PipelineMetrics
from serve_app.metrics import RayMetric, RayMetricFactory


class FakeRayMetric:
    """Stands in for a ``ray.util.metrics`` family: records, checks nothing."""

    def __init__(self, name: str, description: str = "", boundaries: Sequence[float] | None = None, tag_keys: tuple[str, ...] = ()) -> None:
        self.name, self.tag_keys = name, tag_keys
        self.recorded: list[tuple[float, dict[str, str]]] = []

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        self.recorded.append((value, dict(tags or {})))

    set = observe = inc


@pytest.fixture
def ray_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serve_metrics, "ray_metrics", SimpleNamespace(Counter=FakeRayMetric, Gauge=FakeRayMetric, Histogram=FakeRayMetric))


def test_remove_series_drops_the_matching_children_only(ray_metrics: None) -> None:
    family = RayMetricFactory().counter("frames_dropped", "drops", ["camera", "reason"])
    for camera in ("gone", "kept"):
        for reason in ("stale", "fps_limit"):
            family.labels(camera=camera, reason=reason).inc()
    RayMetricFactory().remove_series(family, ["camera", "reason"], {"camera": "gone"})
    assert sorted(family._children) == [("kept", "fps_limit"), ("kept", "stale")]


def test_forget_camera_under_the_ray_factory_drops_the_camera_from_every_family(ray_metrics: None) -> None:
    metrics = PipelineMetrics(RayMetricFactory())
    assert metrics.per_camera and all(isinstance(family, RayMetric) for family, _names in metrics.per_camera)
    for camera in ("gone", "kept"):
        for family, names in metrics.per_camera:
            family.labels(**{name: camera if name == "camera" else "x" for name in names})
    metrics.forget_camera("gone")
    for family, names in metrics.per_camera:
        cameras = {key[names.index("camera")] for key in family._children}
        assert cameras == {"kept"}, f"{family._metric.name}: {cameras}"
    # Ray cannot delete an exported series: the camera's last stream_up reads 0.
    assert metrics.stream_up._metric.recorded[-1] == (0, {"camera": "gone"})
