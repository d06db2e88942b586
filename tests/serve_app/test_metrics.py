"""The Ray metrics adapter forgets a removed camera's series (under Serve, ``forget_camera`` goes through it)."""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import pytest

import serve_app.metrics as serve_metrics
from pipeline.metrics import BATCH_BUCKETS, PipelineMetrics
from serve_app.metrics import RayMetric, RayMetricFactory


class RecordingRayMetric:
    """Stands in for a ``ray.util.metrics`` family: records, checks nothing."""

    def __init__(self, name: str, description: str = "", boundaries: Sequence[float] | None = None, tag_keys: tuple[str, ...] = ()) -> None:
        self.name, self.tag_keys = name, tag_keys
        self.recorded: list[tuple[float, dict[str, str]]] = []

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        self.recorded.append((value, dict(tags or {})))

    set = observe = inc


@pytest.fixture
def ray_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        serve_metrics, "ray_metrics", SimpleNamespace(Counter=RecordingRayMetric, Gauge=RecordingRayMetric, Histogram=RecordingRayMetric)
    )


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
