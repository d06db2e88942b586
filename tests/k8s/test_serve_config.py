"""k8s/, offline: serveConfigV2."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import REPO_ROOT
from tests.k8s.manifests import (
    CAMERAS_MOUNT,
    SERVE_PORT,
    cpu_cores,
    embedded_serve_config,
    ray_container,
    ray_groups,
    rayservice,
    render_k8s,
    source_render,
)


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
