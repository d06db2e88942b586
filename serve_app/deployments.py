"""Ray Serve deployments: the ``pipeline`` building blocks wired into a service.

- ``FaceDetector``: ``@serve.batch`` across the frames of all cameras; receives downscaled frames.
- ``ExpressionClassifier``: ``@serve.batch`` across the faces of all frames; receives face crops.
- ``Ingest``: each replica claims a shard of the cameras from the Redis registry, decodes them,
  sends each camera's freshest frame through the two model deployments (one frame in flight per
  camera, so backpressure drops frames at the source instead of queueing them), tracks faces and
  publishes events.
- ``Controller``: the HTTP API (ingress; the app itself is in ``serve_app/api.py``).

The Controller's routes, auth and error bodies are in ``serve_app/api.py`` (no Ray there).
"""

import asyncio
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from pipeline.analysis import CameraAnalyzer
from pipeline.auth import ApiTokens, check_exposure
from pipeline.checkpoint import ModelMetadata
from pipeline.classification import ExpressionClassifier, crop_faces, crop_margin
from pipeline.config import PipelineConfig, SourceConfig, environment_overrides, merge_sections, parse_config, preview_on
from pipeline.detection import FaceDetection, build_detector, downscale_for_detection, scale_detections
from pipeline.events import EventPublisher, redis_client
from pipeline.isolation import FrameFailures, UnitFailure, call_per_unit, describe_error
from pipeline.live import LiveSummaries
from pipeline.log_limits import RepeatLimitedLog
from pipeline.metrics import PipelineMetrics
from pipeline.preview import PreviewStore, PreviewWriter
from pipeline.priors import PriorSettings
from pipeline.registry import CameraRegistry, ShardWorker, status_to_dict
from pipeline.shutdown import ShutdownBudget, ShutdownReport, shut_down_worker
from pipeline.sources.camera import CameraSource
from pipeline.sources.readers import frame_reader_for
from serve_app.api import OPEN_PATHS, StreamController, build_api
from serve_app.batching import BusyAwareBatchWait
from serve_app.live_routes import PAGE_PATHS, PAGE_PREFIXES, live_hold_s, live_page_router

log = logging.getLogger("ferstream.serve")

# How often an ingest replica reconciles its cameras with the registry, and the lease it holds
# on each: a dead replica's cameras move to another one after at most LEASE_S.
RECONCILE_INTERVAL_S = 1.0
LEASE_S = 10.0
# A replica that could not renew a lease for LEASE_S - LEASE_FENCE_MARGIN_S stops that camera, so it
# has stopped before the lease expires and another replica claims it (about 6 failed renewals first).
LEASE_FENCE_MARGIN_S = 3.0
FENCE_CHECK_INTERVAL_S = 0.2
# On shutdown: how long to wait for a reconcile tick in progress (it may be in a Redis call), then the
# steps of pipeline.shutdown. Their sum stays under the Ingest's graceful_shutdown_timeout_s in
# configs/serve-*.yaml (tests/serve_app/test_app.py checks it).
RECONCILER_JOIN_S = 2.0
INGEST_SHUTDOWN = ShutdownBudget(stop_s=8.0, flush_s=10.0)
# The replica's own threads, not a camera's (describe() lists the cameras' ones).
REPLICA_THREADS = frozenset({"ferstream-reconciler", "ferstream-lease-fence"})
MODEL_CALL_TIMEOUT_S = 30.0


def load_pipeline_config(data: dict[str, Any], origin: str) -> PipelineConfig:
    """Each replica validates the config it was bound with and applies its own environment
    (the Redis URL and password come from the pod, never through the app graph)."""
    return parse_config(PipelineConfig, merge_sections(data, environment_overrides()), origin)


class BatchingOptions(BaseModel):
    """The ``user_config`` of the model deployments: tunable without a redeploy. Each deployment's
    defaults are its ``*_BATCHING`` constant below, which its ``@serve.batch`` decorator uses too."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    max_batch_size: int = Field(ge=1, le=4096)
    batch_wait_timeout_s: float = Field(ge=0, le=10)


# The defaults, one home per deployment: the values configs/serve-cpu.yaml has run with, which it
# states (tests/serve_app/test_app.py checks both); serve-gpu.yaml batches more. Frames come one per
# camera per tick, crops every face of a frame at once: the classifier's batches are the larger.
DETECTOR_BATCHING = BatchingOptions(max_batch_size=4, batch_wait_timeout_s=0.01)
CLASSIFIER_BATCHING = BatchingOptions(max_batch_size=64, batch_wait_timeout_s=0.005)


def reconfigure_batching(
    method: Any, batch_wait: BusyAwareBatchWait, user_config: dict[str, Any], deployment: str, defaults: BatchingOptions
) -> None:
    """Apply a deployment's ``user_config``; a key it leaves out keeps that deployment's default."""
    options = parse_config(BatchingOptions, {**defaults.model_dump(), **user_config}, f"{deployment}.user_config")
    method.set_max_batch_size(options.max_batch_size)
    batch_wait.base_wait_s = options.batch_wait_timeout_s
    method.set_batch_wait_timeout_s(options.batch_wait_timeout_s)


async def submit(method: Any, batch_wait: BusyAwareBatchWait, item: np.ndarray) -> Any:
    """Queue one item for a ``@serve.batch`` method, first setting the wait of the batch it may
    open: the model's remaining busy time, so batches fill while a call runs (serve_app.batching)."""
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


def per_item(model_call: Callable[[list[Any]], Any]) -> Callable[[list[Any]], list[Any]]:
    """A batched model call whose items fail alone: the batch's result per item, or that item's
    ``UnitFailure`` when the batch raised and so did the item on its own (``pipeline.isolation``).
    ``@serve.batch`` hands each caller its own element, so one bad image fails one request."""

    def call(items: list[Any]) -> list[Any]:
        return [
            result if isinstance(result, UnitFailure) else result[0] for result in call_per_unit(model_call, [[item] for item in items])
        ]

    return call


def item_result(result: Any) -> Any:
    """One request's element of a ``per_item`` batch: raise its failure to that caller only."""
    if isinstance(result, UnitFailure):
        raise result.error
    return result


def replica_metrics() -> PipelineMetrics:
    from serve_app.metrics import RayMetricFactory

    return PipelineMetrics(RayMetricFactory())


@serve.deployment(name="FaceDetector")
class FaceDetectorDeployment:
    def __init__(self, config: dict[str, Any]) -> None:
        pipeline_config = load_pipeline_config(config, "FaceDetector")
        self.detector = build_detector(pipeline_config.detector)
        from pipeline.warmup import warm_up_detector  # here, not at the top: keeps the import block as other branches edit it

        warm_up_detector(self.detector, pipeline_config.detector.detection_size)  # before the first camera frame
        self.metrics = replica_metrics()
        self.batch_wait = BusyAwareBatchWait(DETECTOR_BATCHING.batch_wait_timeout_s)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        reconfigure_batching(self.detect_batch, self.batch_wait, user_config, "FaceDetector", DETECTOR_BATCHING)

    async def detect(self, image: np.ndarray) -> list[FaceDetection]:
        return item_result(await submit(self.detect_batch, self.batch_wait, image))

    @serve.batch(max_batch_size=DETECTOR_BATCHING.max_batch_size, batch_wait_timeout_s=DETECTOR_BATCHING.batch_wait_timeout_s)
    async def detect_batch(self, images: list[np.ndarray]) -> list[list[FaceDetection] | UnitFailure[np.ndarray]]:
        return await run_batch(per_item(self.detector.detect_batch), images, self.batch_wait, self.metrics, "detect")


@serve.deployment(name="ExpressionClassifier")
class ExpressionClassifierDeployment:
    def __init__(self, config: dict[str, Any]) -> None:
        pipeline_config = load_pipeline_config(config, "ExpressionClassifier")
        self.classifier = ExpressionClassifier(pipeline_config.classifier)
        from pipeline.warmup import warm_up_classifier

        warm_up_classifier(self.classifier)  # before the first face
        self.metrics = replica_metrics()
        self.batch_wait = BusyAwareBatchWait(CLASSIFIER_BATCHING.batch_wait_timeout_s)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        reconfigure_batching(self.classify_batch, self.batch_wait, user_config, "ExpressionClassifier", CLASSIFIER_BATCHING)

    def metadata(self) -> ModelMetadata:
        return self.classifier.metadata

    async def classify(self, crop: np.ndarray) -> np.ndarray:
        return item_result(await submit(self.classify_batch, self.batch_wait, crop))

    @serve.batch(max_batch_size=CLASSIFIER_BATCHING.max_batch_size, batch_wait_timeout_s=CLASSIFIER_BATCHING.batch_wait_timeout_s)
    async def classify_batch(self, crops: list[np.ndarray]) -> list[np.ndarray | UnitFailure[np.ndarray]]:
        return await run_batch(per_item(self.classifier.predict), crops, self.batch_wait, self.metrics, "classify")


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
        failures: FrameFailures,
        preview: PreviewWriter | None = None,
    ) -> None:
        self.camera = camera
        self.failures = failures
        self.preview = preview
        self.detection_size = pipeline_config.detector.detection_size
        self.metadata = metadata
        self.face_margin = crop_margin(pipeline_config.detector, metadata)
        self.detector = detector
        self.classifier = classifier
        self.metrics = metrics
        self.source = CameraSource(camera, metrics, reader=frame_reader_for(camera.url))
        self.analyzer = CameraAnalyzer(
            camera.camera_id,
            pipeline_config.tracker,
            metadata.classes,
            metadata.model_id,
            publisher,
            metrics,
            failures,
            detection_interval=pipeline_config.detector.interval,
            priors=PriorSettings.from_config(pipeline_config.priors, metadata.classes),
            abstain_below=pipeline_config.events.abstain_below,
        )
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

    def _run(self) -> None:
        while not self._stop.is_set():
            frame = self.source.read(timeout=0.5)
            if frame is None:
                if self.source.finished:
                    return
                continue
            self._process(frame)

    def _process(self, frame: Any) -> None:
        """One frame through the models; a failed model call (a bad frame, a replica restarting, a
        timeout) is counted in ``frames_failed_total`` and costs this frame only."""
        camera_id = self.camera.camera_id
        if self.analyzer.detection_due():
            try:
                small = downscale_for_detection(frame.image, self.detection_size)
                found = self.detector.detect.remote(small.image).result(timeout_s=MODEL_CALL_TIMEOUT_S)
                detections = scale_detections(found, small.scale)
            except Exception as error:
                self.failures.record(camera_id, "detect", frame.frame_index, error)
                return
            self.metrics.faces_detected.labels(camera=camera_id).inc(len(detections))
        else:  # detector.interval: the tracks' boxes carried on
            detections = self.analyzer.carried_detections()
        try:
            crops = crop_faces(frame.image, detections, self.metadata, self.face_margin)
            # One request per face: the classifier's @serve.batch groups faces across all frames.
            responses = [self.classifier.classify.remote(crop) for crop in crops]
            rows = [response.result(timeout_s=MODEL_CALL_TIMEOUT_S) for response in responses]
            probabilities = np.stack(rows) if rows else np.zeros((0, len(self.metadata.classes)), np.float32)
        except Exception as error:
            self.failures.record(camera_id, "classify", frame.frame_index, error)
            return
        self.analyzer.analyze(frame, detections, probabilities)
        if self.preview is not None:
            self.preview.offer(frame.image, detections, probabilities)


class IngestOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    max_cameras: int = Field(16, ge=1, le=1024, description="cameras one replica decodes at most")


@serve.deployment(name="Ingest")
class IngestDeployment:
    def __init__(self, config: dict[str, Any], detector: DeploymentHandle, classifier: DeploymentHandle) -> None:
        self.config = load_pipeline_config(config, "Ingest")
        self.detector = detector
        self.classifier = classifier
        self.metrics = replica_metrics()
        self.publisher = EventPublisher(self.config.events, self.metrics)
        self.failures = FrameFailures(self.metrics, log)
        self._reconcile_log = RepeatLimitedLog(log)
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
        self.shard = ShardWorker(
            self.registry, self.worker_id, start=self._start_session, stop=self._stop_session, fence_margin_s=LEASE_FENCE_MARGIN_S
        )
        self.shutdown_report: ShutdownReport | None = None
        self._reconciler = threading.Thread(target=self._reconcile_forever, name="ferstream-reconciler", daemon=True)
        self._reconciler.start()
        self.shard.start_fence(FENCE_CHECK_INTERVAL_S)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.options = parse_config(IngestOptions, user_config, "Ingest.user_config")

    def check_health(self) -> None:
        if not self._reconciler.is_alive():
            raise RuntimeError("the camera reconciler thread died")
        if not self.shard.fence_alive:
            raise RuntimeError("the lease fence thread died")

    def describe(self) -> dict[str, Any]:
        """This replica's cameras, live ferstream threads and frames lost per camera and stage (for operators and the tests)."""
        with self._lock:
            cameras = sorted(self.sessions)
        threads = sorted(t.name for t in threading.enumerate() if t.name.startswith("ferstream-") and t.name not in REPLICA_THREADS)
        return {
            "worker_id": self.worker_id,
            "cameras": cameras,
            "threads": threads,
            "frames_failed": self.failures.counts(),
            "fenced": list(self.shard.fenced),
        }

    def __del__(self) -> None:
        """Serve's shutdown hook: stop decoding, flush the outage buffer, release the leases
        (pipeline.shutdown), within graceful_shutdown_timeout_s."""
        if getattr(self, "shutdown_report", None) is not None:
            return  # Serve called it already; this is the garbage collector's call
        if not hasattr(self, "_reconciler"):
            return  # the constructor failed (a bad config): nothing was started
        self._stop.set()
        self._reconciler.join(timeout=RECONCILER_JOIN_S)
        self.shutdown_report = shut_down_worker(self.shard, self.publisher, INGEST_SHUTDOWN)

    # -- reconciliation ---------------------------------------------------------------------
    def _reconcile_forever(self) -> None:
        while not self._stop.wait(RECONCILE_INTERVAL_S):
            try:
                self.shard.reconcile(self.options.max_cameras)
                with self._lock:
                    statuses = [status_to_dict(session.source.status(), self.worker_id) for session in self.sessions.values()]
                self.registry.put_statuses(statuses, ttl_s=LEASE_S)
            except Exception as error:
                # Redis unreachable or similar: running cameras keep running; try again next tick.
                self._reconcile_log.error(
                    type(error).__name__, "ingest %s: reconcile failed: %s", self.worker_id, describe_error(error), exc_info=error
                )

    def _model_metadata(self) -> ModelMetadata:
        if self._metadata is None:
            self._metadata = self.classifier.metadata.remote().result(timeout_s=MODEL_CALL_TIMEOUT_S)
        return self._metadata

    def _start_session(self, camera: SourceConfig) -> None:
        metadata = self._model_metadata()
        # Only a camera that asked for it (or every camera, with previews: all) draws previews: face
        # pixels stay in this process otherwise.
        preview = None
        if preview_on(self.config.previews, camera):
            store = PreviewStore(self.registry.client, self.config.events.stream_prefix)
            preview = PreviewWriter(store, camera.camera_id, metadata.classes)
        session = CameraSession(
            camera, self.config, metadata, self.detector, self.classifier, self.publisher, self.metrics, self.failures, preview
        )
        session.start()
        with self._lock:
            self.sessions[camera.camera_id] = session
        log.info("ingest %s: camera %s started (%s)", self.worker_id, camera.camera_id, session.source.status().url)

    def _stop_session(self, camera_id: str) -> None:
        with self._lock:
            session = self.sessions.pop(camera_id, None)
        if session is not None:
            session.stop()
            self.failures.forget_camera(camera_id)
            log.info("ingest %s: camera %s stopped", self.worker_id, camera_id)


def serve_http_host() -> str | None:
    """The host Serve's HTTP proxies bind (``http_options.host``), None when it cannot be read.

    Ray has no public call for it; the Serve client's is private, so any failure counts as
    "unknown", which ``check_exposure`` treats as reachable from outside."""
    try:
        from ray.serve.context import _get_global_client

        host = _get_global_client().http_config.host
        return str(host) if host else None
    except Exception as error:
        log.warning("cannot read Serve's HTTP host (%s): treating it as not loopback", type(error).__name__)
        return None


@serve.deployment(name="Controller")
@serve.ingress()  # no app yet: this replica builds it (__serve_build_asgi_app__) with the tokens it reads
class ControllerDeployment:
    def __init__(self, config: dict[str, Any], cameras: list[dict[str, Any]], ingest: DeploymentHandle) -> None:
        # Tokens come from this replica's environment (FERSTREAM_API_TOKENS / FERSTREAM_API_TOKEN_FILE),
        # never from the application's arguments, which Ray keeps in its cluster state.
        auth = check_exposure(ApiTokens.from_environment(), serve_http_host())
        pipeline_config = load_pipeline_config(config, "Controller")
        events = pipeline_config.events
        self.registry = CameraRegistry(
            redis_client(events.redis_url, events.socket_timeout_s, events.password_value), events.stream_prefix, LEASE_S
        )
        self.ingest = ingest
        # Start-up cameras are registered once: one the API removed since stays removed.
        self.registry.seed(parse_config(SourceConfig, camera, "cameras_file") for camera in cameras)
        controller = StreamController(self.registry, pipeline_config.url_policy, pipeline_config.max_cameras, pipeline_config.previews)
        live = LiveSummaries(self.registry.client, events.stream_prefix, hold_s=live_hold_s(events))
        previews = PreviewStore(self.registry.client, events.stream_prefix)
        page = live_page_router(live, previews, self.registry.cameras, pipeline_config.previews)
        self.api = build_api(controller, auth, routers=[page], open_paths=OPEN_PATHS | PAGE_PATHS, open_prefixes=PAGE_PREFIXES)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self.api
