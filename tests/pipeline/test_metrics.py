"""PipelineMetrics: a removed camera's series leave the registry, in every family with a camera label."""

from __future__ import annotations

from prometheus_client import generate_latest

from pipeline.metrics import PipelineMetrics


def touch_every_camera_series(metrics: PipelineMetrics, camera_id: str) -> None:
    """Record one value in every family that has a camera label, with every other label filled in."""
    for family, label_names in metrics.per_camera:
        child = family.labels(**{name: camera_id if name == "camera" else "x" for name in label_names})
        for method in ("inc", "set", "observe"):
            if hasattr(child, method):
                getattr(child, method)(1)
                break


def test_forget_camera_removes_its_series_from_every_family_and_keeps_the_others() -> None:
    metrics = PipelineMetrics()
    touch_every_camera_series(metrics, "gone")
    touch_every_camera_series(metrics, "kept")
    metrics.faces_detected.labels(camera="gone").inc(3)
    metrics.frames_dropped.labels(camera="gone", reason="stale").inc()
    metrics.stage_latency.labels(stage="detect").observe(0.1)
    before = generate_latest(metrics.registry).decode()
    assert 'camera="gone"' in before and 'camera="kept"' in before

    metrics.forget_camera("gone")
    after = generate_latest(metrics.registry).decode()
    assert 'camera="gone"' not in after
    assert after.count('camera="kept"') == before.count('camera="kept"')
    assert metrics.registry.get_sample_value("ferstream_stage_latency_seconds_count", {"stage": "detect"}) == 1


def test_every_family_with_a_camera_label_is_tracked() -> None:
    metrics = PipelineMetrics()
    families = {name for name, value in vars(metrics).items() if hasattr(value, "labels") and hasattr(value, "_labelnames")}
    with_camera = {name for name in families if "camera" in getattr(metrics, name)._labelnames}
    tracked = {id(family) for family, _labels in metrics.per_camera}
    assert with_camera and {name for name in with_camera if id(getattr(metrics, name)) in tracked} == with_camera
    assert "frames_failed" in with_camera and "stream_up" in with_camera


def test_a_camera_added_again_starts_its_series_afresh() -> None:
    metrics = PipelineMetrics()
    metrics.frames_decoded.labels(camera="cam1").inc(5)
    metrics.forget_camera("cam1")
    metrics.frames_decoded.labels(camera="cam1").inc()
    assert metrics.registry.get_sample_value("ferstream_frames_decoded_total", {"camera": "cam1"}) == 1
