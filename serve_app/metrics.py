"""Ray's metrics agent as a ``MetricFactory``: every replica's pipeline metrics reach Prometheus
through the node's Ray metrics port, next to Ray Serve's own metrics.

Why not prometheus-client in each replica: replicas come and go, several share a node and a
port, and Prometheus would need to discover each one. Ray already exports per node, labels
each series with its replica, and KubeRay/kube-prometheus-stack know how to scrape it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ray.util import metrics as ray_metrics

from pipeline.metrics import NAMESPACE


class _BoundMetric:
    def __init__(self, metric: Any, tags: dict[str, str]) -> None:
        self._metric = metric
        self._tags = tags

    def inc(self, amount: float = 1.0) -> None:
        # Ray counters reject non-positive increments; prometheus-client treats 0 as a no-op.
        if amount > 0:
            self._metric.inc(amount, tags=self._tags)

    def set(self, value: float) -> None:
        self._metric.set(value, tags=self._tags)

    def observe(self, value: float) -> None:
        self._metric.observe(value, tags=self._tags)


class RayMetric(_BoundMetric):
    """A family with prometheus-client's ``labels()`` interface over a ``ray.util.metrics`` metric."""

    def __init__(self, metric: Any, label_names: Sequence[str]) -> None:
        super().__init__(metric, {})
        self._label_names = tuple(label_names)
        self._children: dict[tuple[str, ...], _BoundMetric] = {}

    def labels(self, **values: str) -> _BoundMetric:
        key = tuple(str(values[name]) for name in self._label_names)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = _BoundMetric(self._metric, dict(zip(self._label_names, key, strict=True)))
        return child

    def forget(self, matching: Mapping[str, str]) -> None:
        """Drop the children whose labels include ``matching``. ``ray.util.metrics`` has no call to
        delete an exported series, so Ray keeps exporting what was recorded (``stream_up`` is 0 by then)."""
        positions = {self._label_names.index(name): value for name, value in matching.items()}
        for key in [key for key in self._children if all(key[index] == value for index, value in positions.items())]:
            del self._children[key]


class RayMetricFactory:
    def __init__(self, namespace: str = NAMESPACE) -> None:
        self.namespace = namespace

    def _name(self, name: str) -> str:
        return f"{self.namespace}_{name}"

    def counter(self, name: str, documentation: str, labels: Sequence[str]) -> RayMetric:
        return RayMetric(ray_metrics.Counter(self._name(name), documentation, tag_keys=tuple(labels)), labels)

    def gauge(self, name: str, documentation: str, labels: Sequence[str]) -> RayMetric:
        return RayMetric(ray_metrics.Gauge(self._name(name), documentation, tag_keys=tuple(labels)), labels)

    def histogram(self, name: str, documentation: str, labels: Sequence[str], buckets: Sequence[float]) -> RayMetric:
        metric = ray_metrics.Histogram(self._name(name), documentation, boundaries=[float(b) for b in buckets], tag_keys=tuple(labels))
        return RayMetric(metric, labels)

    def remove_series(self, family: RayMetric, label_names: Sequence[str], matching: Mapping[str, str]) -> None:
        family.forget(matching)
