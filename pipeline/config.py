"""Typed, validated configuration for the ferstream pipeline.

Every section is a frozen pydantic model that rejects unknown keys, so a typo in a
YAML file fails at start with the offending field named instead of being ignored.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, ValidationInfo, field_validator, model_validator

ModelT = TypeVar("ModelT", bound=BaseModel)

CAMERA_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
SUPPORTED_URL_SCHEMES = ("file", "rtsp", "rtsps", "http", "https")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BackoffConfig(StrictModel):
    """Exponential backoff with jitter and a cap, shared by reconnects and Redis retries."""

    initial_s: float = Field(0.5, gt=0)
    max_s: float = Field(30.0, gt=0)
    multiplier: float = Field(2.0, ge=1.0)
    jitter: float = Field(0.2, ge=0.0, le=1.0, description="fraction of the delay drawn at random")

    @model_validator(mode="after")
    def _cap_not_below_initial(self) -> BackoffConfig:
        if self.max_s < self.initial_s:
            raise ValueError("max_s must be >= initial_s")
        return self


def url_scheme(url: str) -> str:
    """The scheme of a source URL; a bare path counts as ``file``."""
    match = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", url)
    return match.group(1).lower() if match else "file"


class SourceConfig(StrictModel):
    """One camera: where it comes from and how fast we process it."""

    camera_id: str = Field(pattern=CAMERA_ID_PATTERN)
    url: str = Field(min_length=1)
    transport: Literal["tcp", "udp"] = "tcp"
    target_fps: float | None = Field(5.0, gt=0, description="process at most this many frames a second; null: all")
    loop: bool = Field(False, description="files only: start again at the end instead of ending")
    realtime: bool = Field(
        True,
        description="files only: pace frames by PTS like a live camera; false: decode only as fast as frames are taken, dropping none",
    )
    open_timeout_s: float = Field(10.0, gt=0)
    watchdog_timeout_s: float = Field(10.0, gt=0, description="reconnect when open but silent this long")
    reconnect: BackoffConfig = BackoffConfig()
    max_reconnects: int | None = Field(None, ge=0, description="give up after this many; null: never (live)")

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        scheme = url_scheme(url)
        if scheme not in SUPPORTED_URL_SCHEMES:
            raise ValueError(f"unsupported URL scheme {scheme!r}; use one of {', '.join(SUPPORTED_URL_SCHEMES)}")
        return url

    @property
    def is_file(self) -> bool:
        return url_scheme(self.url) == "file"


class DetectorConfig(StrictModel):
    kind: Literal["mtcnn", "yunet"] = "mtcnn"
    detection_size: int = Field(640, ge=64, le=4096, description="longest side frames are downscaled to")
    min_face_size: int = Field(20, ge=8, description="in detection-size pixels")
    score_threshold: float = Field(0.9, ge=0.0, le=1.0)
    device: Literal["cpu", "cuda"] = "cpu"
    onnx_path: Path | None = Field(None, description="YuNet ONNX model; required when kind is yunet")

    @model_validator(mode="after")
    def _yunet_needs_model(self) -> DetectorConfig:
        if self.kind == "yunet" and self.onnx_path is None:
            raise ValueError("onnx_path is required when kind is 'yunet'")
        return self


class ClassifierConfig(StrictModel):
    backend: Literal["torch", "onnxruntime"] = Field(
        "torch", description="torch: a .pt checkpoint in PyTorch; onnxruntime: a `ferstream export --format onnx` file on CPU"
    )
    checkpoint: Path | None = Field(
        None,
        validate_default=True,
        description="the model file (~ is expanded); null: the default model shipped with ferstream (torch backend only)",
    )
    device: Literal["cpu", "cuda"] = "cpu"
    half: bool = Field(True, description="float16 where the device supports it (CUDA)")
    batch_size: int = Field(64, ge=1, le=4096)

    # Field validators (backend is declared first, so it is in info.data) put the offending field in the error's path.
    @field_validator("checkpoint")
    @classmethod
    def _onnxruntime_needs_an_onnx_file(cls, checkpoint: Path | None, info: ValidationInfo) -> Path | None:
        if checkpoint is None and info.data.get("backend") == "onnxruntime":
            raise ValueError("required when backend is 'onnxruntime': the .onnx file `ferstream export --format onnx` wrote")
        return checkpoint

    @field_validator("device")
    @classmethod
    def _onnxruntime_runs_on_cpu(cls, device: str, info: ValidationInfo) -> str:
        if device != "cpu" and info.data.get("backend") == "onnxruntime":
            raise ValueError("must be 'cpu' when backend is 'onnxruntime' (this backend runs on CPU only)")
        return device

    @property
    def checkpoint_path(self) -> Path | None:
        """``checkpoint`` with ``~`` expanded where the model is loaded (the config may be parsed elsewhere)."""
        return self.checkpoint.expanduser() if self.checkpoint is not None else None


class TrackerConfig(StrictModel):
    iou_threshold: float = Field(0.3, gt=0.0, lt=1.0)
    max_missed_frames: int = Field(5, ge=0, description="frames a track survives without a match")
    ema_alpha: float = Field(0.5, gt=0.0, le=1.0, description="weight of the newest probabilities; 1: no smoothing")


class EventsConfig(StrictModel):
    redis_url: str = "redis://127.0.0.1:6379/0"
    stream_prefix: str = Field("ferstream", pattern=r"^[A-Za-z0-9_.:-]+$")
    maxlen: int = Field(10_000, ge=1, description="approximate cap per camera stream (XADD MAXLEN ~)")
    policy: Literal["every_face", "on_change"] = "every_face"
    heartbeat_s: float = Field(5.0, gt=0, description="on_change: re-emit an unchanged track this often")
    buffer_max_events: int = Field(10_000, ge=1, description="events held while Redis is unreachable")
    retry: BackoffConfig = BackoffConfig(initial_s=0.2, max_s=5.0)
    socket_timeout_s: float = Field(2.0, gt=0)
    password: SecretStr | None = Field(None, description="Redis AUTH; prefer the FERSTREAM_REDIS_PASSWORD environment variable")

    @property
    def password_value(self) -> str | None:
        return self.password.get_secret_value() if self.password is not None else None

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, url: str) -> str:
        if url_scheme(url) not in ("redis", "rediss", "unix"):
            raise ValueError("redis_url must start with redis://, rediss:// or unix://")
        return url


class MetricsConfig(StrictModel):
    """The single-process runner's Prometheus endpoint (under Serve, metrics go through Ray's metrics port)."""

    enabled: bool = True
    host: str = Field(
        "127.0.0.1",
        description="address the metrics server binds; loopback by default so that a laptop run exposes nothing. "
        "0.0.0.0 for a Prometheus on another host or in a container",
    )
    port: int = Field(9108, ge=0, le=65535, description="0: pick a free port")


class PipelineConfig(StrictModel):
    cameras: list[SourceConfig] = Field(default_factory=list)
    detector: DetectorConfig = DetectorConfig()
    classifier: ClassifierConfig = ClassifierConfig()
    tracker: TrackerConfig = TrackerConfig()
    events: EventsConfig = EventsConfig()
    metrics: MetricsConfig = MetricsConfig()

    @field_validator("cameras")
    @classmethod
    def _unique_camera_ids(cls, cameras: list[SourceConfig]) -> list[SourceConfig]:
        seen: set[str] = set()
        for camera in cameras:
            if camera.camera_id in seen:
                raise ValueError(f"duplicate camera_id {camera.camera_id!r}")
            seen.add(camera.camera_id)
        return cameras


def describe_validation_error(error: ValidationError, origin: str) -> str:
    """One line per problem, each naming the dotted field path, e.g. ``cameras.0.target_fps``."""
    lines = []
    for problem in error.errors():
        field = ".".join(str(part) for part in problem["loc"]) or "<root>"
        lines.append(f"{origin}: {field}: {problem['msg']}")
    return "\n".join(lines)


def parse_config(model: type[ModelT], data: Any, origin: str) -> ModelT:
    try:
        return model.model_validate(data if data is not None else {})
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error, origin)) from None


def load_yaml(path: Path | str) -> Any:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"{path}: cannot read config: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {error.start}: {error.reason})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None


def load_config(path: Path | str, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Load and validate a pipeline config; ``overrides`` replace top-level sections."""
    data = load_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    data.update(overrides or {})
    return parse_config(PipelineConfig, data, str(path))


REDIS_URL_ENV = "FERSTREAM_REDIS_URL"
REDIS_PASSWORD_ENV = "FERSTREAM_REDIS_PASSWORD"


def apply_environment(config: PipelineConfig, environ: dict[str, str] | None = None) -> PipelineConfig:
    """Deployment settings that do not belong in a file: the Redis URL and its password (a Secret)."""
    environ = dict(os.environ) if environ is None else environ
    events: dict[str, Any] = {}
    if environ.get(REDIS_URL_ENV):
        events["redis_url"] = environ[REDIS_URL_ENV]
    if environ.get(REDIS_PASSWORD_ENV):
        events["password"] = environ[REDIS_PASSWORD_ENV]
    if not events:
        return config
    data = dump_config(config)
    data["events"].update(events)
    return parse_config(PipelineConfig, data, "environment")


def dump_config(config: PipelineConfig) -> dict[str, Any]:
    """A plain, JSON-able dict that ``PipelineConfig.model_validate`` turns back into ``config``,
    secrets included (``model_dump`` masks them), for handing the config to another process."""
    data = config.model_dump(mode="json")
    data["events"]["password"] = config.events.password_value
    return data
