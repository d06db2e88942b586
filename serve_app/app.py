"""The Serve application builder: ``import_path: serve_app.app:build_app`` in configs/serve-*.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict
from ray.serve import Application

from pipeline.config import (
    REDIS_PASSWORD_ENV,
    REDIS_URL_ENV,
    ConfigError,
    PipelineConfig,
    SourceConfig,
    load_config,
    load_yaml,
    parse_config,
    refuse_preview,
)
from pipeline.url_policy import UrlOrigin, UrlRefused
from serve_app.deployments import ControllerDeployment, ExpressionClassifierDeployment, FaceDetectorDeployment, IngestDeployment

REPO_ROOT = Path(__file__).resolve().parents[1]


class AppArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    pipeline_config: str = "configs/pipeline.yaml"
    cameras_file: str | None = None


def resolve_path(path: str) -> Path:
    """Relative to the working directory, else to the repository (``serve run`` may start elsewhere)."""
    candidate = Path(path)
    if candidate.is_absolute() or candidate.exists():
        return candidate
    return REPO_ROOT / candidate


def absolute_file_url(camera: SourceConfig) -> SourceConfig:
    """Replicas run in other working directories: pin relative file paths down while we know what they meant."""
    if camera.is_file and "://" not in camera.url and not Path(camera.url).is_absolute():
        return camera.model_copy(update={"url": str(resolve_path(camera.url).resolve())})
    return camera


def load_cameras(path: Path) -> list[SourceConfig]:
    data = load_yaml(path) or []
    if not isinstance(data, list):
        raise ConfigError(f"{path}: a cameras file is a YAML list of cameras")
    return [parse_config(SourceConfig, camera, f"{path}[{index}]") for index, camera in enumerate(data)]


def replica_args(config: PipelineConfig, origin: str) -> dict[str, Any]:
    """The pipeline config as the replicas' bound arguments. Ray keeps those in its cluster state
    (GCS, dashboard, ``serve status``), so a Redis secret is refused here: each replica reads its
    own from its environment (``load_pipeline_config`` in serve_app/deployments.py)."""
    if config.events.password is not None:
        raise ConfigError(
            f"{origin}: events.password: under Serve the Redis password comes from {REDIS_PASSWORD_ENV} in the replicas' "
            "environment (a Secret in Kubernetes); a password in the config would travel in Ray's application arguments"
        )
    try:
        has_password = urlsplit(config.events.redis_url).password is not None
    except ValueError:  # the config accepted it; a URL urllib cannot split has no password it could find either
        has_password = False
    if has_password:
        raise ConfigError(
            f"{origin}: events.redis_url: holds a password; under Serve give the URL in {REDIS_URL_ENV} and the password in "
            f"{REDIS_PASSWORD_ENV} in the replicas' environment, not in the config (it would travel in Ray's application arguments)"
        )
    return config.model_dump(mode="json")


def build_app(args: dict[str, Any]) -> Application:
    app_args = parse_config(AppArgs, args, "application args")
    pipeline_path = resolve_path(app_args.pipeline_config)
    config = load_config(pipeline_path)
    cameras = list(config.cameras)
    if app_args.cameras_file:
        cameras.extend(load_cameras(resolve_path(app_args.cameras_file)))
    cameras = [absolute_file_url(camera) for camera in cameras]
    seen: set[str] = set()
    for camera in cameras:
        if camera.camera_id in seen:
            raise ConfigError(f"application args: camera_id {camera.camera_id!r} is defined twice (pipeline_config and cameras_file)")
        seen.add(camera.camera_id)
        try:
            # The pipeline config's own cameras passed this already; the cameras file's had only their shape checked.
            config.url_policy.check(camera.url, UrlOrigin.CONFIG)
        except UrlRefused as refusal:
            raise ConfigError(f"application args: camera {camera.camera_id!r}: url: {refusal}") from None
        # The same check for the cameras file's: previews: none refuses a camera asking for one.
        preview_refused = refuse_preview(config.previews, camera)
        if preview_refused is not None:
            raise ConfigError(f"application args: preview: {preview_refused}")
    if len(cameras) > config.max_cameras:
        raise ConfigError(
            f"application args: {len(cameras)} cameras (pipeline_config and cameras_file), more than max_cameras ({config.max_cameras})"
        )
    data = replica_args(config, str(pipeline_path))
    detector = FaceDetectorDeployment.bind(data)
    classifier = ExpressionClassifierDeployment.bind(data)
    ingest = IngestDeployment.bind(data, detector, classifier)
    return ControllerDeployment.bind(data, [camera.model_dump(mode="json") for camera in cameras], ingest)
