"""k8s/, offline: Redis, network policy, security, secrets."""

from __future__ import annotations

from typing import Any

import yaml

from tests.k8s.manifests import (
    K8S,
    RAY_USER,
    REDIS_CLIENT_LABEL,
    REDIS_SECRET,
    REDIS_SECRET_KEY,
    REDIS_USER,
    env_by_name,
    objects,
    one,
    pod_specs,
    ray_groups,
    rayservice,
)


def test_redis_statefulset(overlay: str, docs: tuple[dict[str, Any], ...]) -> None:
    redis = one(docs, "StatefulSet", "redis")
    pod = redis["spec"]["template"]["spec"]
    container = pod["containers"][0]
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert env_by_name(container)["REDIS_PASSWORD"]["valueFrom"] == {"secretKeyRef": {"name": REDIS_SECRET, "key": REDIS_SECRET_KEY}}
    data_mount = next(mount for mount in container["volumeMounts"] if mount["mountPath"] == "/data")
    claims = [claim["metadata"]["name"] for claim in redis["spec"].get("volumeClaimTemplates", [])]
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    if overlay == "prod":
        assert data_mount["name"] in claims and data_mount["name"] not in volumes, "prod keeps Redis on a PVC"
    else:
        assert not claims and "emptyDir" in volumes[data_mount["name"]], "dev has no PVC"
    assert redis["spec"]["replicas"] == 1
    assert one(docs, "Service", redis["spec"]["serviceName"])["spec"]["clusterIP"] == "None"
    service = one(docs, "Service", "redis")
    assert service["spec"]["ports"][0]["port"] == 6379
    assert service["spec"]["selector"].items() <= redis["spec"]["template"]["metadata"]["labels"].items()
    url = one(docs, "ConfigMap", "ferstream-env")["data"]["FERSTREAM_REDIS_URL"]
    assert url == "redis://redis:6379/0", "the in-cluster Redis is the Service named redis"


def test_network_policy_admits_only_app_pods_to_redis(docs: tuple[dict[str, Any], ...]) -> None:
    policy = one(docs, "NetworkPolicy", "redis")["spec"]
    redis_labels = one(docs, "StatefulSet", "redis")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= redis_labels.items()
    assert policy["policyTypes"] == ["Ingress"]
    assert policy["ingress"] == [
        {"from": [{"podSelector": {"matchLabels": dict([REDIS_CLIENT_LABEL])}}], "ports": [{"protocol": "TCP", "port": 6379}]}
    ]
    for name, group in ray_groups(rayservice(docs)):
        assert group["template"]["metadata"]["labels"].get(REDIS_CLIENT_LABEL[0]) == REDIS_CLIENT_LABEL[1], f"{name} must reach Redis"
    assert REDIS_CLIENT_LABEL[0] not in redis_labels


def test_containers_run_non_root_without_privileges(docs: tuple[dict[str, Any], ...]) -> None:
    for where, template in pod_specs(docs):
        pod_context = template["spec"].get("securityContext", {})
        expected_user = REDIS_USER if "redis" in where else RAY_USER
        assert pod_context.get("runAsNonRoot") is True, where
        assert pod_context.get("runAsUser") == expected_user, where
        assert pod_context.get("seccompProfile") == {"type": "RuntimeDefault"}, where
        for container in template["spec"]["containers"] + template["spec"].get("initContainers", []):
            context = container.get("securityContext", {})
            assert context.get("allowPrivilegeEscalation") is False, f"{where}/{container['name']}"
            assert context.get("capabilities", {}).get("drop") == ["ALL"], f"{where}/{container['name']}"
            assert not context.get("privileged"), f"{where}/{container['name']}"
            assert context.get("runAsUser", expected_user) == expected_user
    autoscaler = rayservice(docs)["spec"]["rayClusterConfig"]["autoscalerOptions"]["securityContext"]
    assert (
        autoscaler["runAsNonRoot"] is True
        and autoscaler["allowPrivilegeEscalation"] is False
        and autoscaler["capabilities"]["drop"] == ["ALL"]
    )


def test_no_secret_values_in_the_manifests(docs: tuple[dict[str, Any], ...]) -> None:
    assert not objects(docs, "Secret"), "the Redis Secret is created by the operator (k8s/README.md), never committed"
    refs: list[dict[str, Any]] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "secretKeyRef" in node:
                refs.append(node["secretKeyRef"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(list(docs))
    assert refs and all(ref == {"name": REDIS_SECRET, "key": REDIS_SECRET_KEY} for ref in refs)
    for kustomization in K8S.rglob("kustomization.yaml"):
        assert "secretGenerator" not in yaml.safe_load(kustomization.read_text(encoding="utf-8")), kustomization
