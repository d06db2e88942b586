"""The Grafana dashboard (serve_app/dashboards/ferstream.json) against the metrics that exist.

``ray_ferstream_*`` names are derived from ``PipelineMetrics`` (through Ray's exporter
``ferstream_x`` becomes ``ray_ferstream_x``, counters gain ``_total``, histograms are read
through ``_bucket``/``_sum``/``_count``); ``ray_serve_*`` names from the metric declarations in
the installed Ray Serve's source. Every expression also passes ``promtool check rules`` when
promtool is installed (Debian's prometheus package).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import ray.serve
import yaml

from pipeline.metrics import PipelineMetrics
from tests.conftest import REPO_ROOT, require

DASHBOARD = REPO_ROOT / "serve_app" / "dashboards" / "ferstream.json"
ROWS = ["Streams", "Models", "Latency", "Events", "Serve"]
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
CAMERA_QUERY = "label_values(ray_ferstream_frames_decoded_total, camera)"
GRID_WIDTH = 24

METRIC_NAME = re.compile(r"\bray_[a-zA-Z0-9_]+")
BY_CLAUSE = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
SELECTOR = re.compile(r"\{([^{}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
# A counter or histogram bucket series is only meaningful through rate()/increase().
CUMULATIVE = re.compile(r"\bray_[a-zA-Z0-9_]+_(?:total|bucket)\b")
CUMULATIVE_IN_RATE = re.compile(r"\b(?:rate|increase|irate)\(\s*ray_[a-zA-Z0-9_]+_(?:total|bucket)\b")


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def graph_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [panel for panel in dashboard["panels"] if panel["type"] != "row"]


def expressions(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel."""
    for panel in graph_panels(dashboard):
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


# -- the metric families that exist ---------------------------------------------------------------


class RecordingFactory:
    """A ``MetricFactory`` that only writes down what PipelineMetrics declares."""

    def __init__(self) -> None:
        self.labels: dict[str, tuple[str, ...]] = {}

    def _record(self, name: str, labels: Sequence[str]) -> None:
        self.labels[f"ferstream_{name}"] = tuple(labels)

    def counter(self, name: str, documentation: str, labels: Sequence[str]) -> None:
        self._record(name, labels)

    def gauge(self, name: str, documentation: str, labels: Sequence[str]) -> None:
        self._record(name, labels)

    def histogram(self, name: str, documentation: str, labels: Sequence[str], buckets: Sequence[float]) -> None:
        self._record(name, labels)


def exported_names(family: str, kind: str) -> set[str]:
    """The series names Ray's metrics port exports for one family (Ray prefixes ``ray_``)."""
    base = f"ray_{family}"
    if kind == "counter":
        return {f"{base}_total"}
    if kind == "histogram":
        return {f"{base}_bucket", f"{base}_sum", f"{base}_count"}
    return {base}


@pytest.fixture(scope="module")
def ferstream_families() -> dict[str, set[str]]:
    """PipelineMetrics family name -> its exported series names, from the prometheus registry."""
    families = {family.name: exported_names(family.name, family.type) for family in PipelineMetrics().registry.collect()}
    assert len(families) >= 15 and all(name.startswith("ferstream_") for name in families)
    return families


@pytest.fixture(scope="module")
def ferstream_labels(ferstream_families: dict[str, set[str]]) -> dict[str, set[str]]:
    """Exported series name -> the label names it carries (``le`` on buckets)."""
    factory = RecordingFactory()
    PipelineMetrics(factory)
    assert set(factory.labels) == set(ferstream_families)
    labels: dict[str, set[str]] = {}
    for family, names in ferstream_families.items():
        for name in names:
            labels[name] = set(factory.labels[family]) | ({"le"} if name.endswith("_bucket") else set())
    return labels


@pytest.fixture(scope="module")
def serve_metric_names() -> set[str]:
    """Every ``ray_serve_*`` series the installed Ray Serve declares (grepped from its source)."""
    declaration = re.compile(r"\b(Counter|Gauge|Histogram)\(\s*\"(serve_[a-z0-9_]+)\"")
    names: set[str] = set()
    for path in Path(ray.serve.__file__).parent.rglob("*.py"):
        for kind, name in declaration.findall(path.read_text(encoding="utf-8", errors="replace")):
            names |= exported_names(name, kind.lower())
    assert "ray_serve_deployment_processing_latency_ms_bucket" in names, "the Ray Serve source scan found nothing"
    return names


# -- structure ------------------------------------------------------------------------------------


def test_dashboard_is_a_grafana_dashboard(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "ferstream" and dashboard["title"] == "ferstream"
    assert dashboard["schemaVersion"] >= 36  # Grafana 9.x/10+ JSON model
    assert isinstance(dashboard["panels"], list) and graph_panels(dashboard)
    assert "id" not in dashboard or dashboard["id"] is None, "an exported id would clash on import"


def test_rows_are_in_order(dashboard: dict[str, Any]) -> None:
    assert [panel["title"] for panel in dashboard["panels"] if panel["type"] == "row"] == ROWS
    assert dashboard["panels"][0]["type"] == "row"


def test_panel_ids_are_unique_and_the_grid_has_no_overlaps(dashboard: dict[str, Any]) -> None:
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    boxes = []
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= GRID_WIDTH, panel["title"]
        boxes.append((panel["title"], grid["x"], grid["y"], grid["x"] + grid["w"], grid["y"] + grid["h"]))
    for index, (title, x0, y0, x1, y1) in enumerate(boxes):
        for other, ox0, oy0, ox1, oy1 in boxes[index + 1 :]:
            assert x1 <= ox0 or ox1 <= x0 or y1 <= oy0 or oy1 <= y0, f"{title!r} overlaps {other!r}"


def test_template_variables(dashboard: dict[str, Any]) -> None:
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    camera = variables["camera"]
    assert camera["type"] == "query" and camera["datasource"] == DATASOURCE
    assert camera["definition"] == CAMERA_QUERY
    query = camera["query"]
    assert (query["query"] if isinstance(query, dict) else query) == CAMERA_QUERY
    assert camera["multi"] and camera["includeAll"] and camera["allValue"] == ".*"


def test_every_panel_queries_prometheus_through_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    for panel in graph_panels(dashboard):
        assert panel["datasource"] == DATASOURCE, panel["title"]
        targets = panel.get("targets") or []
        assert targets, f"{panel['title']!r} has no target"
        ref_ids = [target["refId"] for target in targets]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        for target in targets:
            assert target["datasource"] == DATASOURCE, panel["title"]
            assert target["expr"].strip() and METRIC_NAME.search(target["expr"]), f"{panel['title']!r}: no PromQL metric"


# -- metric names -----------------------------------------------------------------------------------


def dashboard_metric_names(dashboard: dict[str, Any]) -> set[str]:
    names = {name for _title, expr in expressions(dashboard) for name in METRIC_NAME.findall(expr)}
    return names | set(METRIC_NAME.findall(CAMERA_QUERY))


def test_every_ferstream_metric_in_the_dashboard_exists(dashboard: dict[str, Any], ferstream_families: dict[str, set[str]]) -> None:
    known = set().union(*ferstream_families.values())
    used = {name for name in dashboard_metric_names(dashboard) if name.startswith("ray_ferstream_")}
    assert used and used <= known, f"not exported by PipelineMetrics: {sorted(used - known)}"


def test_every_pipeline_metrics_family_is_on_the_dashboard(dashboard: dict[str, Any], ferstream_families: dict[str, set[str]]) -> None:
    used = dashboard_metric_names(dashboard)
    missing = sorted(family for family, names in ferstream_families.items() if not names & used)
    assert not missing, f"PipelineMetrics families without a panel: {missing}"


def test_every_serve_metric_in_the_dashboard_exists_in_this_ray(dashboard: dict[str, Any], serve_metric_names: set[str]) -> None:
    used = {name for name in dashboard_metric_names(dashboard) if name.startswith("ray_serve_")}
    assert used, "the Serve row shows no ray_serve_* metric"
    assert used <= serve_metric_names, f"unknown to Ray Serve {ray.__version__}: {sorted(used - serve_metric_names)}"
    assert {name for name in dashboard_metric_names(dashboard) if not name.startswith(("ray_ferstream_", "ray_serve_"))} == set()


def test_ferstream_expressions_use_only_their_metrics_labels(dashboard: dict[str, Any], ferstream_labels: dict[str, set[str]]) -> None:
    for title, expr in expressions(dashboard):
        metrics = set(METRIC_NAME.findall(expr))
        if not all(name in ferstream_labels for name in metrics):
            continue  # ray_serve_*: labels come from Ray (deployment, replica, application, ...)
        allowed = set().union(*(ferstream_labels[name] for name in metrics))
        used = {label.strip() for clause in BY_CLAUSE.findall(expr) for label in clause.split(",") if label.strip()}
        used |= {label for selector in SELECTOR.findall(expr) for label in MATCHER.findall(selector)}
        assert used <= allowed, f"{title!r}: labels {sorted(used - allowed)} are not on {sorted(metrics)}"


def test_camera_labelled_series_follow_the_camera_variable(dashboard: dict[str, Any], ferstream_labels: dict[str, set[str]]) -> None:
    for title, expr in expressions(dashboard):
        for name in set(METRIC_NAME.findall(expr)):
            if "camera" in ferstream_labels.get(name, set()):
                assert re.search(rf'\b{name}\{{[^}}]*camera=~"\$camera"', expr), f"{title!r}: {name} ignores $camera"


def test_counters_and_buckets_are_read_through_rate(dashboard: dict[str, Any]) -> None:
    for title, expr in expressions(dashboard):
        assert len(CUMULATIVE.findall(expr)) == len(CUMULATIVE_IN_RATE.findall(expr)), f"{title!r}: a raw counter in {expr}"
        if "histogram_quantile" in expr:
            assert all("le" in clause for clause in BY_CLAUSE.findall(expr)), f"{title!r}: quantile without le"


def test_every_expression_is_valid_promql(dashboard: dict[str, Any], tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    require(promtool is not None, "promtool is not installed (apt-get install prometheus)")
    assert promtool is not None
    rules = []
    for index, (_title, expr) in enumerate(expressions(dashboard)):
        # Grafana substitutes its variables before Prometheus sees the query.
        promql = expr.replace("$__rate_interval", "1m").replace("$camera", ".*")
        assert "$" not in promql, f"unsubstituted variable in {expr}"
        rules.append({"record": f"dashboard:expr_{index}", "expr": promql})
    rules_file = tmp_path / "dashboard-rules.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
