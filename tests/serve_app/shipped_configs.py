"""The shipped Serve configs (configs/serve-*.yaml) as the tests read them."""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel

from serve_app.app import REPO_ROOT
from serve_app.deployments import (
    ControllerDeployment,
    ExpressionClassifierDeployment,
    FaceDetectorDeployment,
    IngestDeployment,
)

SERVE_CONFIGS = ("configs/serve-cpu.yaml", "configs/serve-gpu.yaml")
MODEL_DEPLOYMENTS = (FaceDetectorDeployment.name, ExpressionClassifierDeployment.name)
ALL_DEPLOYMENTS = {
    deployment.name for deployment in (ControllerDeployment, IngestDeployment, FaceDetectorDeployment, ExpressionClassifierDeployment)
}


def load_serve_config(relative: str) -> dict[str, Any]:
    data = yaml.safe_load((REPO_ROOT / relative).read_text())
    assert isinstance(data, dict)
    return data


def application(config: dict[str, Any]) -> dict[str, Any]:
    (app,) = config["applications"]
    return app


def deployments(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {deployment["name"]: deployment for deployment in application(config)["deployments"]}


def assert_known_keys(data: dict[str, Any], model: type[BaseModel], where: str) -> None:
    # Ray's schemas ignore unknown keys, so a typo ("autoscalling_config") would silently do nothing.
    unknown = set(data) - set(model.model_fields)
    assert not unknown, f"{where}: keys {sorted(unknown)} are unknown to {model.__name__}"


# -- the shipped Serve configs ------------------------------------------------------------------
