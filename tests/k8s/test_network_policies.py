"""k8s/, offline: who reaches the Ray pods (k8s/base/networkpolicies.yaml), service-account tokens, the API token."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.k8s.manifests import METRICS_PORT, SERVE_PORT, env_by_name, objects, pod_specs, ray_container, ray_groups, rayservice

RAY_NODE_LABEL = ("ferstream.io/ray-node", "true")
API_CLIENT_LABEL = {"ferstream.io/api-client": "true"}
RAY_OPS_LABEL = {"ferstream.io/ray-ops": "true"}
KUBERAY_OPERATOR = {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}
MONITORING_NAMESPACE = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
RAY_PODS = {"podSelector": {"matchLabels": dict([RAY_NODE_LABEL])}}
API_TOKEN_SECRET, API_TOKEN_FILE = "ferstream-api-tokens", "/etc/ferstream-api/tokens"
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
DASHBOARD_PORT, GCS_PORT, CLIENT_PORT = 8265, 6379, 10001


def ray_policies(docs: tuple[dict[str, Any], ...], direction: str) -> list[dict[str, Any]]:
    """The NetworkPolicies that select the Ray pods for ``direction`` (Ingress or Egress)."""
    policies = []
    for policy in objects(docs, "NetworkPolicy"):
        spec = policy["spec"]
        if direction in spec["policyTypes"] and spec["podSelector"].get("matchLabels", {}).items() <= dict([RAY_NODE_LABEL]).items():
            policies.append(spec)
    return policies


def ingress_peers(docs: tuple[dict[str, Any], ...], port: int) -> list[dict[str, Any]]:
    """Every peer that some policy admits to the Ray pods on ``port`` (a rule without ports admits all)."""
    peers = []
    for spec in ray_policies(docs, "Ingress"):
        for rule in spec.get("ingress", []):
            ports = [entry["port"] for entry in rule.get("ports", [])]
            if not ports or port in ports:
                assert rule.get("from"), "a rule without 'from' admits every source"
                peers.extend(rule["from"])
    return peers


def test_every_ray_pod_is_selected_by_the_ray_policies(docs: tuple[dict[str, Any], ...]) -> None:
    for name, group in ray_groups(rayservice(docs)):
        assert group["template"]["metadata"]["labels"].get(RAY_NODE_LABEL[0]) == RAY_NODE_LABEL[1], name
    names = {policy["metadata"]["name"] for policy in objects(docs, "NetworkPolicy")}
    assert {"ray-internal", "ray-serve", "ray-metrics", "ray-egress", "redis"} <= names


def test_dashboard_gcs_and_ray_ports_only_from_the_ray_cluster_the_operator_and_ops(docs: tuple[dict[str, Any], ...]) -> None:
    ops = {"namespaceSelector": {"matchLabels": RAY_OPS_LABEL}}
    assert sorted(map(json.dumps, ingress_peers(docs, DASHBOARD_PORT))) == sorted(map(json.dumps, [RAY_PODS, KUBERAY_OPERATOR, ops]))
    for port in (GCS_PORT, CLIENT_PORT, 52365 + 1, 12345):  # GCS, the Ray client, any worker port
        peers = ingress_peers(docs, port)
        assert peers == [RAY_PODS], f"port {port}: {peers}"
    assert ingress_peers(docs, 52365) == [RAY_PODS, KUBERAY_OPERATOR]


def test_serve_only_from_labelled_api_clients(docs: tuple[dict[str, Any], ...]) -> None:
    peers = ingress_peers(docs, SERVE_PORT)
    api_clients = [
        {"namespaceSelector": {"matchLabels": API_CLIENT_LABEL}},
        {"namespaceSelector": {}, "podSelector": {"matchLabels": API_CLIENT_LABEL}},
    ]
    assert peers == [RAY_PODS, *api_clients]


def test_metrics_only_from_the_monitoring_namespace(docs: tuple[dict[str, Any], ...]) -> None:
    for port in (METRICS_PORT, 44217, 44227):
        assert ingress_peers(docs, port) == [RAY_PODS, MONITORING_NAMESPACE], port
    # Every port the PodMonitors scrape is one the metrics policy opens.
    for monitor in objects(docs, "PodMonitor"):
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            port = {"metrics": METRICS_PORT, "as-metrics": 44217, "dash-metrics": 44227}[endpoint["port"]]
            assert MONITORING_NAMESPACE in ingress_peers(docs, port)


def test_ray_pods_cannot_reach_the_cloud_metadata_endpoints(docs: tuple[dict[str, Any], ...]) -> None:
    (egress,) = ray_policies(docs, "Egress")
    blocks = [peer["ipBlock"] for rule in egress["egress"] for peer in rule.get("to", []) if "ipBlock" in peer]
    assert {block["cidr"] for block in blocks} == {"0.0.0.0/0", "::/0"}
    excepted = {cidr for block in blocks for cidr in block.get("except", [])}
    assert {"169.254.169.254/32", "100.100.100.200/32", "fd00:ec2::254/128"} <= excepted
    dns = [rule for rule in egress["egress"] if any(port.get("port") == 53 for port in rule.get("ports", []))]
    assert dns, "cluster DNS stays reachable"


def test_no_service_account_token_where_none_is_needed(docs: tuple[dict[str, Any], ...]) -> None:
    for where, template in pod_specs(docs):
        assert template["spec"].get("automountServiceAccountToken") is False, where
        for container in template["spec"]["containers"]:
            assert all(not mount["mountPath"].startswith(SERVICE_ACCOUNT_DIR) for mount in container.get("volumeMounts", [])), where
    # Only the autoscaler sidecar (it scales the RayCluster through the API) gets a projected token.
    cluster = rayservice(docs)["spec"]["rayClusterConfig"]
    (mount,) = [m for m in cluster["autoscalerOptions"]["volumeMounts"] if m["mountPath"] == SERVICE_ACCOUNT_DIR]
    volumes = {volume["name"]: volume for volume in cluster["headGroupSpec"]["template"]["spec"]["volumes"]}
    sources = volumes[mount["name"]]["projected"]["sources"]
    assert any("serviceAccountToken" in source for source in sources) and mount.get("readOnly") is True


def test_the_api_token_is_a_secret_mounted_as_a_file(docs: tuple[dict[str, Any], ...]) -> None:
    for name, group in ray_groups(rayservice(docs)):
        container = ray_container(group)
        env = env_by_name(container)
        assert env["FERSTREAM_API_TOKEN_FILE"] == {"name": "FERSTREAM_API_TOKEN_FILE", "value": API_TOKEN_FILE}, name
        assert "FERSTREAM_API_TOKENS" not in env and "FERSTREAM_API_AUTH" not in env, f"{name}: tokens from the Secret only, auth on"
        volumes = {volume["name"]: volume for volume in group["template"]["spec"]["volumes"]}
        mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
        mount = mounts[str(Path(API_TOKEN_FILE).parent)]
        assert mount.get("readOnly") is True
        secret = volumes[mount["name"]]["secret"]
        assert secret["secretName"] == API_TOKEN_SECRET and not secret.get("optional"), f"{name}: no pod starts without the tokens"
        assert secret.get("defaultMode", 0o644) & 0o007 == 0, f"{name}: the token file is not world-readable"


def test_the_dashboard_is_not_exposed_outside_the_cluster(docs: tuple[dict[str, Any], ...]) -> None:
    assert not objects(docs, "Ingress") and not objects(docs, "Route")
    for service in objects(docs, "Service"):
        assert service["spec"].get("type", "ClusterIP") == "ClusterIP", service["metadata"]["name"]
    head = rayservice(docs)["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress")
    assert "headService" not in head
