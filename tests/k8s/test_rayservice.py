"""k8s/, offline: the RayService."""

from __future__ import annotations

import json
from typing import Any

import yaml

from tests.k8s.manifests import (
    CAMERAS_MOUNT,
    METRICS_PORT,
    REDIS_SECRET,
    REDIS_SECRET_KEY,
    SERVE_PORT,
    cpu_cores,
    env_by_name,
    one,
    pod_specs,
    ray_container,
    ray_groups,
    ray_version,
    rayservice,
)


def test_rayservice_topology(overlay: str, docs: tuple[dict[str, Any], ...]) -> None:
    spec = rayservice(docs)["spec"]
    assert spec["upgradeStrategy"] == {"type": "NewCluster"}
    cluster = spec["rayClusterConfig"]
    assert cluster["rayVersion"] == ray_version()
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "the head runs no Serve replicas"
    groups = {group["groupName"]: group for group in cluster["workerGroupSpecs"]}
    assert set(groups) == ({"cpu", "gpu"} if overlay == "prod" else {"cpu"})
    for name, group in groups.items():
        assert 0 <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"], name
        assert group["maxReplicas"] >= 1, name
    if overlay == "dev":
        assert groups["cpu"]["replicas"] == 1, "dev runs one small worker"
        assert cpu_cores(ray_container(groups["cpu"])["resources"]["limits"]["cpu"]) <= 4


def test_ray_images_match_the_ray_version(docs: tuple[dict[str, Any], ...]) -> None:
    version = ray_version()
    for name, group in ray_groups(rayservice(docs)):
        image = ray_container(group)["image"]
        assert ":" in image.rsplit("/", 1)[-1], f"{name}: untagged image {image}"
        tag = image.rsplit(":", 1)[1]
        assert f"ray{version}-py311" in tag, f"{name}: image tag {tag} does not name Ray {version}/py311"
        needs_gpu = "nvidia.com/gpu" in ray_container(group)["resources"].get("limits", {})
        assert tag.endswith("-gpu") == needs_gpu, f"{name}: GPU pods use the -gpu image, others the CPU image ({tag})"


def test_gpu_group_requests_and_tolerates_gpus(overlay: str, docs: tuple[dict[str, Any], ...]) -> None:
    groups = dict(ray_groups(rayservice(docs)))
    if overlay == "dev":
        assert "nvidia.com/gpu" not in json.dumps(docs), "dev is CPU only"
        return
    gpu = groups["gpu"]
    resources = ray_container(gpu)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"]
    assert int(resources["limits"]["nvidia.com/gpu"]) >= 1
    tolerations = gpu["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
    for name, group in groups.items():
        if name != "gpu":
            assert "nvidia.com/gpu" not in json.dumps(group), f"{name} must not claim GPUs"


def test_every_container_has_requests_and_limits(docs: tuple[dict[str, Any], ...]) -> None:
    for where, template in pod_specs(docs):
        for container in template["spec"]["containers"]:
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container.get("resources", {}).get(kind, {})), f"{where}/{container['name']}: {kind}"
    autoscaler = rayservice(docs)["spec"]["rayClusterConfig"]["autoscalerOptions"]["resources"]
    assert {"cpu", "memory"} <= set(autoscaler["requests"]) and {"cpu", "memory"} <= set(autoscaler["limits"])
    for name, group in ray_groups(rayservice(docs)):
        resources = ray_container(group)["resources"]
        assert resources["requests"] == resources["limits"], f"{name}: Ray pods get requests == limits (Ray sizes itself from limits)"


def test_ray_pods_get_redis_env_cameras_and_ports(docs: tuple[dict[str, Any], ...]) -> None:
    env_map = one(docs, "ConfigMap", "ferstream-env")["data"]
    assert env_map["FERSTREAM_REDIS_URL"].startswith(("redis://", "rediss://"))
    cameras = one(docs, "ConfigMap", "ferstream-cameras")
    assert "cameras.yaml" in cameras["data"]
    for name, group in ray_groups(rayservice(docs)):
        container = ray_container(group)
        env = env_by_name(container)
        assert env["FERSTREAM_REDIS_URL"]["valueFrom"] == {"configMapKeyRef": {"name": "ferstream-env", "key": "FERSTREAM_REDIS_URL"}}, name
        assert env["FERSTREAM_REDIS_PASSWORD"]["valueFrom"] == {"secretKeyRef": {"name": REDIS_SECRET, "key": REDIS_SECRET_KEY}}, name
        volumes = {volume["name"]: volume for volume in group["template"]["spec"]["volumes"]}
        mounts = {mount["mountPath"]: mount for mount in container["volumeMounts"]}
        assert volumes[mounts[CAMERAS_MOUNT]["name"]]["configMap"]["name"] == "ferstream-cameras", name
        assert mounts[CAMERAS_MOUNT].get("readOnly") is True
        assert volumes[mounts["/dev/shm"]["name"]]["emptyDir"]["medium"] == "Memory", f"{name}: Ray's object store wants a memory /dev/shm"
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        assert ports["metrics"] == METRICS_PORT and group["rayStartParams"]["metrics-export-port"] == str(METRICS_PORT), name
        assert ports["serve"] == SERVE_PORT, name
        assert not {"readinessProbe", "livenessProbe"} & set(container), f"{name}: KubeRay's default probes (Serve health) apply"


def test_cameras_configmap_is_a_valid_camera_list(docs: tuple[dict[str, Any], ...]) -> None:
    from pydantic import TypeAdapter

    from pipeline.config import SourceConfig

    cameras = TypeAdapter(list[SourceConfig]).validate_python(
        yaml.safe_load(one(docs, "ConfigMap", "ferstream-cameras")["data"]["cameras.yaml"])
    )
    assert cameras and len({camera.camera_id for camera in cameras}) == len(cameras)
