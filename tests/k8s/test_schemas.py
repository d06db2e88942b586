"""k8s/, offline: building and schemas."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from typing import Any

import jsonschema
import pytest
from packaging.version import Version

from tests.conftest import require
from tests.k8s.manifests import CRD_KINDS, KUBERNETES_VERSION, MIN_KUSTOMIZE, build, kubectl, objects, one, ray_groups, rayservice


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
