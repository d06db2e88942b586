"""k8s/, offline: monitoring."""

from __future__ import annotations

import json
from typing import Any

from tests.conftest import REPO_ROOT
from tests.k8s.manifests import CLIENT_SIDE_APPLY_LIMIT, objects, one, ray_container, ray_groups, rayservice, render_k8s


def selected_templates(docs: tuple[dict[str, Any], ...], selector: dict[str, str]) -> list[dict[str, Any]]:
    """The Ray pod templates a label selector matches, with the labels KubeRay adds (ray.io/node-type)."""
    matched = []
    for name, group in ray_groups(rayservice(docs)):
        labels = {**group["template"]["metadata"]["labels"], "ray.io/node-type": "head" if name == "head" else "worker"}
        if selector.items() <= labels.items():
            matched.append(group)
    return matched


def test_pod_monitors_scrape_every_ray_pod(docs: tuple[dict[str, Any], ...]) -> None:
    monitors = objects(docs, "PodMonitor")
    covered: set[int] = set()
    for monitor in monitors:
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        groups = selected_templates(docs, monitor["spec"]["selector"]["matchLabels"])
        assert groups, f"PodMonitor {monitor['metadata']['name']} selects no Ray pod"
        covered.update(id(group) for group in groups)
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            for group in groups:
                names = {port["name"] for port in ray_container(group)["ports"]}
                assert endpoint["port"] in names, f"{monitor['metadata']['name']}: no port {endpoint['port']} on a selected pod"
        assert any(endpoint["port"] == "metrics" for endpoint in monitor["spec"]["podMetricsEndpoints"])
    assert covered == {id(group) for _, group in ray_groups(rayservice(docs))}, "every Ray pod (head and workers) is scraped"


def test_grafana_dashboard_configmap(docs: tuple[dict[str, Any], ...]) -> None:
    dashboard = one(docs, "ConfigMap", "ferstream-grafana-dashboard")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    (content,) = dashboard["data"].values()
    parsed = json.loads(content)
    assert parsed.get("title") and isinstance(parsed.get("panels"), list)
    for doc in objects(docs, "ConfigMap"):
        assert len(json.dumps(doc)) < CLIENT_SIDE_APPLY_LIMIT, f"{doc['metadata']['name']} is too large for kubectl apply"


def test_dashboard_copy_matches_serve_app() -> None:
    source = REPO_ROOT / render_k8s.DASHBOARD_SOURCE
    copy = REPO_ROOT / render_k8s.DASHBOARD_COPY
    if source.is_file():
        assert copy.read_bytes() == source.read_bytes(), "run python scripts/render_k8s.py"
    else:  # the committed placeholder until serve_app ships its dashboard
        assert json.loads(copy.read_text(encoding="utf-8"))["uid"] == "ferstream"
