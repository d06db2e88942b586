"""Ray Serve deployments: the ``pipeline`` building blocks wired into a service.

- ``FaceDetector``: ``@serve.batch`` across the frames of all cameras; receives downscaled frames.
- ``ExpressionClassifier``: ``@serve.batch`` across the faces of all frames; receives face crops.
- ``Ingest``: each replica claims a shard of the cameras from the Redis registry, decodes them,
  sends each camera's freshest frame through the two model deployments (one frame in flight per
  camera, so backpressure drops frames at the source instead of queueing them), tracks faces and
  publishes events.
- ``Controller``: the HTTP API (ingress).

No ``from __future__ import annotations`` here: FastAPI reads the endpoint annotations at run
time to tell a JSON body from query parameters.
"""

import asyncio
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Response
from fastapi.responses import FileResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from pipeline.analysis import CameraAnalyzer
from pipeline.batching import BusyAwareBatchWait
from pipeline.checkpoint import ModelMetadata
from pipeline.classification import ExpressionClassifier, crop_faces
from pipeline.config import ConfigError, EventsConfig, PipelineConfig, SourceConfig, apply_environment, parse_config
from pipeline.detection import FaceDetection, build_detector, downscale_for_detection, scale_detections
from pipeline.events import EventPublisher, redis_client
from pipeline.live import LiveSummaries
from pipeline.metrics import PipelineMetrics
from pipeline.preview import PreviewStore, PreviewWriter
from pipeline.registry import CameraRegistry, ShardWorker, status_to_dict
from pipeline.sources import CameraSource, redact_url

log = logging.getLogger("ferstream.serve")

# How often an ingest replica reconciles its cameras with the registry, and the lease it holds
# on each: a dead replica's cameras move to another one after at most LEASE_S.
RECONCILE_INTERVAL_S = 1.0
LEASE_S = 10.0
MODEL_CALL_TIMEOUT_S = 30.0


def load_pipeline_config(data: dict[str, Any], origin: str) -> PipelineConfig:
    """Each replica validates the config it was bound with and applies its own environment
    (the Redis URL and password come from the pod, never through the app graph)."""
    return apply_environment(parse_config(PipelineConfig, data, origin))


class BatchingOptions(BaseModel):
    """The ``user_config`` of the model deployments: tunable without a redeploy."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    max_batch_size: int = Field(8, ge=1, le=4096)
    batch_wait_timeout_s: float = Field(0.01, ge=0, le=10)


def reconfigure_batching(method: Any, batch_wait: BusyAwareBatchWait, user_config: dict[str, Any], deployment: str) -> None:
    options = parse_config(BatchingOptions, user_config, f"{deployment}.user_config")
    method.set_max_batch_size(options.max_batch_size)
    batch_wait.base_wait_s = options.batch_wait_timeout_s
    method.set_batch_wait_timeout_s(options.batch_wait_timeout_s)


async def submit(method: Any, batch_wait: BusyAwareBatchWait, item: np.ndarray) -> Any:
    """Queue one item for a ``@serve.batch`` method, first setting the wait of the batch it may
    open: the model's remaining busy time, so batches fill while a call runs (pipeline.batching)."""
    method.set_batch_wait_timeout_s(batch_wait.wait_timeout(time.perf_counter()))
    return await method(item)


async def run_batch(
    model_call: Callable[[list[np.ndarray]], Any],
    items: list[np.ndarray],
    batch_wait: BusyAwareBatchWait,
    metrics: PipelineMetrics,
    stage: str,
) -> Any:
    """One model call on a formed batch, off the event loop (so health checks and new requests are
    answered meanwhile), with its latency and batch size recorded."""
    started = time.perf_counter()
    batch_wait.started(len(items), started)
    try:
        result = await asyncio.to_thread(model_call, items)
    finally:
        duration = time.perf_counter() - started
        batch_wait.finished(len(items), duration)
    metrics.stage_latency.labels(stage=stage).observe(duration)
    metrics.batch_size.labels(stage=stage).observe(len(items))
    return result


def replica_metrics() -> PipelineMetrics:
    from serve_app.metrics import RayMetricFactory

    return PipelineMetrics(RayMetricFactory())


@serve.deployment(name="FaceDetector")
class FaceDetectorDeployment:
    def __init__(self, config: dict[str, Any]) -> None:
        pipeline_config = load_pipeline_config(config, "FaceDetector")
        self.detector = build_detector(pipeline_config.detector)
        self.metrics = replica_metrics()
        self.batch_wait = BusyAwareBatchWait(BatchingOptions().batch_wait_timeout_s)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        reconfigure_batching(self.detect_batch, self.batch_wait, user_config, "FaceDetector")

    async def detect(self, image: np.ndarray) -> list[FaceDetection]:
        return await submit(self.detect_batch, self.batch_wait, image)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def detect_batch(self, images: list[np.ndarray]) -> list[list[FaceDetection]]:
        return await run_batch(self.detector.detect_batch, images, self.batch_wait, self.metrics, "detect")


@serve.deployment(name="ExpressionClassifier")
class ExpressionClassifierDeployment:
    def __init__(self, config: dict[str, Any]) -> None:
        pipeline_config = load_pipeline_config(config, "ExpressionClassifier")
        self.classifier = ExpressionClassifier(pipeline_config.classifier)
        self.metrics = replica_metrics()
        self.batch_wait = BusyAwareBatchWait(BatchingOptions().batch_wait_timeout_s)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        reconfigure_batching(self.classify_batch, self.batch_wait, user_config, "ExpressionClassifier")

    def metadata(self) -> ModelMetadata:
        return self.classifier.metadata

    async def classify(self, crop: np.ndarray) -> np.ndarray:
        return await submit(self.classify_batch, self.batch_wait, crop)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def classify_batch(self, crops: list[np.ndarray]) -> list[np.ndarray]:
        return list(await run_batch(self.classifier.predict, crops, self.batch_wait, self.metrics, "classify"))


class CameraSession:
    """One camera on an ingest replica: a decode thread (``CameraSource``) and a processing thread
    that keeps exactly one frame in flight through the model deployments."""

    def __init__(
        self,
        camera: SourceConfig,
        pipeline_config: PipelineConfig,
        metadata: ModelMetadata,
        detector: DeploymentHandle,
        classifier: DeploymentHandle,
        publisher: EventPublisher,
        metrics: PipelineMetrics,
        preview: PreviewWriter | None = None,
    ) -> None:
        self.camera = camera
        self.preview = preview
        self.detection_size = pipeline_config.detector.detection_size
        self.metadata = metadata
        self.detector = detector
        self.classifier = classifier
        self.metrics = metrics
        self.source = CameraSource(camera, metrics)
        self.analyzer = CameraAnalyzer(camera.camera_id, pipeline_config.tracker, metadata.classes, metadata.model_id, publisher, metrics)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"ferstream-session-{camera.camera_id}", daemon=True)

    def start(self) -> None:
        self.source.start()
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self.source.stop(timeout_s)
        self._thread.join(timeout_s)
        self.analyzer.close()
        if self.preview is not None:
            self.preview.close()

    @property
    def threads_alive(self) -> list[str]:
        return [thread.name for thread in threading.enumerate() if thread.name.endswith(f"-{self.camera.camera_id}")]

    def _run(self) -> None:
        while not self._stop.is_set():
            frame = self.source.read(timeout=0.5)
            if frame is None:
                if self.source.finished:
                    return
                continue
            try:
                self._process(frame)
            except Exception:
                # A failed model call (a replica restarting, a timeout) costs this frame only.
                log.exception("camera %s: frame %d failed", self.camera.camera_id, frame.frame_index)

    def _process(self, frame: Any) -> None:
        camera_id = self.camera.camera_id
        small = downscale_for_detection(frame.image, self.detection_size)
        found = self.detector.detect.remote(small.image).result(timeout_s=MODEL_CALL_TIMEOUT_S)
        detections = scale_detections(found, small.scale)
        self.metrics.faces_detected.labels(camera=camera_id).inc(len(detections))
        crops = crop_faces(frame.image, detections, self.metadata)
        # One request per face: the classifier's @serve.batch groups faces across all frames.
        responses = [self.classifier.classify.remote(crop) for crop in crops]
        rows = [response.result(timeout_s=MODEL_CALL_TIMEOUT_S) for response in responses]
        probabilities = np.stack(rows) if rows else np.zeros((0, len(self.metadata.classes)), np.float32)
        self.analyzer.analyze(frame, detections, probabilities)
        if self.preview is not None:
            self.preview.offer(frame.image, detections, probabilities)


class IngestOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    max_cameras: int = Field(16, ge=1, le=1024, description="cameras one replica decodes at most")


@serve.deployment(name="Ingest")
class IngestDeployment:
    def __init__(self, config: dict[str, Any], detector: DeploymentHandle, classifier: DeploymentHandle) -> None:
        self.config = load_pipeline_config(config, "Ingest")
        self.detector = detector
        self.classifier = classifier
        self.metrics = replica_metrics()
        self.publisher = EventPublisher(self.config.events, self.metrics)
        events = self.config.events
        self.registry = CameraRegistry(
            redis_client(events.redis_url, events.socket_timeout_s, events.password_value), events.stream_prefix, LEASE_S
        )
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.options = IngestOptions()
        self.sessions: dict[str, CameraSession] = {}
        self._metadata: ModelMetadata | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.shard = ShardWorker(self.registry, self.worker_id, start=self._start_session, stop=self._stop_session)
        self._reconciler = threading.Thread(target=self._reconcile_forever, name="ferstream-reconciler", daemon=True)
        self._reconciler.start()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.options = parse_config(IngestOptions, user_config, "Ingest.user_config")

    def check_health(self) -> None:
        if not self._reconciler.is_alive():
            raise RuntimeError("the camera reconciler thread died")

    def describe(self) -> dict[str, Any]:
        """This replica's cameras and live ferstream threads (for operators and the tests)."""
        with self._lock:
            cameras = sorted(self.sessions)
        threads = sorted(t.name for t in threading.enumerate() if t.name.startswith("ferstream-") and t.name != "ferstream-reconciler")
        return {"worker_id": self.worker_id, "cameras": cameras, "threads": threads}

    def __del__(self) -> None:
        self._stop.set()
        self._reconciler.join(timeout=RECONCILE_INTERVAL_S * 5)
        self.shard.shutdown()
        self.publisher.close()

    # -- reconciliation ---------------------------------------------------------------------
    def _reconcile_forever(self) -> None:
        while not self._stop.wait(RECONCILE_INTERVAL_S):
            try:
                self.shard.reconcile(self.options.max_cameras)
                with self._lock:
                    statuses = [status_to_dict(session.source.status(), self.worker_id) for session in self.sessions.values()]
                self.registry.put_statuses(statuses, ttl_s=LEASE_S)
            except Exception:
                # Redis unreachable or similar: running cameras keep running; try again next tick.
                log.exception("ingest %s: reconcile failed", self.worker_id)

    def _model_metadata(self) -> ModelMetadata:
        if self._metadata is None:
            self._metadata = self.classifier.metadata.remote().result(timeout_s=MODEL_CALL_TIMEOUT_S)
        return self._metadata

    def _start_session(self, camera: SourceConfig) -> None:
        metadata = self._model_metadata()
        # Only a camera that asked for it draws previews: face pixels stay in this process otherwise.
        preview = None
        if camera.preview:
            store = PreviewStore(self.registry.client, self.config.events.stream_prefix)
            preview = PreviewWriter(store, camera.camera_id, metadata.classes)
        session = CameraSession(camera, self.config, metadata, self.detector, self.classifier, self.publisher, self.metrics, preview)
        session.start()
        with self._lock:
            self.sessions[camera.camera_id] = session
        log.info("ingest %s: camera %s started (%s)", self.worker_id, camera.camera_id, session.source.status().url)

    def _stop_session(self, camera_id: str) -> None:
        with self._lock:
            session = self.sessions.pop(camera_id, None)
        if session is not None:
            session.stop()
            log.info("ingest %s: camera %s stopped", self.worker_id, camera_id)


class StreamRequest(BaseModel):
    """``POST /streams``: a camera. ``options`` takes any other per-camera setting (see SourceConfig)."""

    model_config = ConfigDict(extra="forbid")
    id: str
    url: str
    fps: float | None = 5.0
    transport: str = "tcp"
    loop: bool = False
    options: dict[str, Any] = Field(default_factory=dict)

    def to_source_config(self) -> SourceConfig:
        fields = {"camera_id": self.id, "url": self.url, "target_fps": self.fps, "transport": self.transport, "loop": self.loop}
        clashes = sorted(set(self.options) & set(fields))
        if clashes:
            raise ConfigError(f"stream: options: {', '.join(clashes)} must be given as the top-level field, not in options")
        return parse_config(SourceConfig, {**self.options, **fields}, "stream")


api = FastAPI(title="ferstream", description="Add, remove and inspect cameras; events go to Redis Streams.")

# The live page: plain files, no build step; served without auth (it asks for the token itself).
STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_TYPES = {"index.html": "text/html", "live.js": "text/javascript", "live.css": "text/css"}


def live_hold_s(events: EventsConfig) -> float:
    """How long one event speaks for its track on the live page: a frame interval at 1 fps or more
    with every_face; with on_change an unchanged track is re-emitted every heartbeat_s."""
    return events.heartbeat_s + 1.0 if events.policy == "on_change" else 1.0


@serve.deployment(name="Controller")
@serve.ingress(api)
class ControllerDeployment:
    def __init__(self, config: dict[str, Any], cameras: list[dict[str, Any]], ingest: DeploymentHandle) -> None:
        pipeline_config = load_pipeline_config(config, "Controller")
        events = pipeline_config.events
        self.registry = CameraRegistry(
            redis_client(events.redis_url, events.socket_timeout_s, events.password_value), events.stream_prefix, LEASE_S
        )
        self.ingest = ingest
        self.live = LiveSummaries(self.registry.client, events.stream_prefix, hold_s=live_hold_s(events))
        self.previews = PreviewStore(self.registry.client, events.stream_prefix)
        # Start-up cameras are registered once: one the API removed since stays removed.
        self.registry.seed(parse_config(SourceConfig, camera, "cameras_file") for camera in cameras)

    @api.post("/streams", status_code=201)
    def add_stream(self, request: StreamRequest) -> dict[str, Any]:
        try:
            camera = request.to_source_config()
        except ConfigError as error:
            raise HTTPException(status_code=422, detail=str(error)) from None
        if not self.registry.add(camera):
            raise HTTPException(status_code=409, detail=f"stream {camera.camera_id!r} already exists")
        return {"id": camera.camera_id, "url": camera.url}

    @api.delete("/streams/{camera_id}", status_code=204)
    def remove_stream(self, camera_id: str) -> Response:
        if not self.registry.remove(camera_id):
            raise HTTPException(status_code=404, detail=f"no stream {camera_id!r}")
        return Response(status_code=204)

    @api.get("/streams")
    def list_streams(self) -> list[dict[str, Any]]:
        cameras = self.registry.cameras()
        statuses = self.registry.statuses(cameras)
        streams = []
        for camera_id, camera in sorted(cameras.items()):
            status = statuses.get(camera_id, {})
            streams.append(
                {
                    "id": camera_id,
                    "url": redact_url(camera.url),
                    "fps_target": camera.target_fps,
                    "transport": camera.transport,
                    "state": status.get("state", "pending"),
                    "measured_fps": status.get("measured_fps", 0.0),
                    "last_frame_time": status.get("last_frame_time"),
                    "reconnects": status.get("reconnects", 0),
                    "frames_decoded": status.get("frames_decoded", 0),
                    "frames_dropped": status.get("frames_dropped", 0),
                    "last_error": status.get("last_error"),
                    "owner": status.get("owner"),
                }
            )
        return streams

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        try:
            await asyncio.to_thread(self.registry.client.ping)
        except Exception as error:
            raise HTTPException(status_code=503, detail=f"redis unreachable: {error}") from None
        return {"status": "ok"}

    # -- the live page and what it polls ----------------------------------------------------
    @api.get("/", include_in_schema=False)
    def live_page(self) -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})

    @api.get("/static/{name}", include_in_schema=False)
    def static_file(self, name: str) -> FileResponse:
        if name not in STATIC_TYPES:  # a fixed list: no path from the request reaches the file system
            raise HTTPException(status_code=404, detail=f"no static file {name!r}")
        return FileResponse(STATIC_DIR / name, media_type=STATIC_TYPES[name], headers={"Cache-Control": "no-cache"})

    def _camera(self, camera_id: str) -> SourceConfig:
        camera = self.registry.cameras().get(camera_id)
        if camera is None:
            raise HTTPException(status_code=404, detail=f"no stream {camera_id!r}")
        return camera

    @api.get("/streams/{camera_id}/summary")
    def stream_summary(self, camera_id: str) -> dict[str, Any]:
        """The last minute of the camera's events: emotion mix, per-5-s face-seconds, current tracks."""
        camera = self._camera(camera_id)
        return {**self.live.summary(camera_id, time.time()).to_json_dict(), "preview": camera.preview}

    @api.get("/streams/{camera_id}/preview.jpg")
    def stream_preview(self, camera_id: str) -> Response:
        if not self._camera(camera_id).preview:
            raise HTTPException(status_code=403, detail=f"preview is off for stream {camera_id!r} (add it with options.preview: true)")
        jpeg = self.previews.get(camera_id)
        if jpeg is None:
            raise HTTPException(status_code=404, detail=f"no preview frame of stream {camera_id!r} yet")
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "no-store"})
