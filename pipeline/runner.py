"""The single-process pipeline: sources → batched detection → batched classification → tracking → events.

Each camera decodes in its own thread (``CameraSource``) into a freshest-frame slot; one
processing loop takes whatever frames are ready across all cameras and handles them as one
batch, DeepStream-style. A frame a stage fails on is counted (``frames_failed_total``), logged
rate-limited, and costs that frame only: the rest of the batch and the other cameras go on.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.analysis import CameraAnalyzer
from pipeline.classification import ExpressionClassifier, crop_faces, crop_margin
from pipeline.config import PipelineConfig, SourceConfig
from pipeline.detection import FaceDetection, FaceDetector, build_detector, detect_frames
from pipeline.events import EventPublisher, ExpressionEvent
from pipeline.frames import SourceStatus, VideoFrame
from pipeline.isolation import FrameFailures, UnitFailure, call_per_unit
from pipeline.metrics import PipelineMetrics
from pipeline.priors import PriorSettings
from pipeline.shutdown import stop_cameras
from pipeline.sources.camera import CameraSource
from pipeline.sources.readers import frame_reader_for

log = logging.getLogger("ferstream.runner")

# Called with a camera's published events of one frame (``ferstream run --print-events``).
EventsCallback = Callable[[str, list[ExpressionEvent]], None]

# How long the loop waits for a first ready frame before checking again for stop/finish.
IDLE_WAIT_S = 0.05
# How long a shutdown waits for the cameras' decode threads, all stopping at once.
SOURCE_STOP_S = 5.0


@dataclass(frozen=True)
class ModelStages:
    detector: FaceDetector
    classifier: ExpressionClassifier
    detection_size: int
    face_margin: float  # crop margin for this detector's boxes (pipeline.classification.crop_margin)

    @classmethod
    def build(cls, config: PipelineConfig) -> ModelStages:
        """The configured detector and classifier, loaded."""
        classifier = ExpressionClassifier(config.classifier)
        return cls(
            detector=build_detector(config.detector),
            classifier=classifier,
            detection_size=config.detector.detection_size,
            face_margin=crop_margin(config.detector, classifier.metadata),
        )


class StreamPipeline:
    """Runs cameras through the models and publishes their events."""

    def __init__(
        self,
        config: PipelineConfig,
        metrics: PipelineMetrics,
        models: ModelStages,
        publisher: EventPublisher,
        on_events: EventsCallback | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.models = models
        self.publisher = publisher
        self.on_events = on_events
        self.failures = FrameFailures(metrics, log)
        self._sources: dict[str, CameraSource] = {}
        self._analyzers: dict[str, CameraAnalyzer] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # Resolved against the model's classes once, here, so a prior that does not fit the model fails at start.
        self._priors = PriorSettings.from_config(config.priors, models.classifier.classes)

    # -- cameras -------------------------------------------------------------------------
    def add_camera(self, source_config: SourceConfig) -> None:
        with self._lock:
            if source_config.camera_id in self._sources:
                raise ValueError(f"camera {source_config.camera_id!r} already exists")
            source = CameraSource(source_config, self.metrics, reader=frame_reader_for(source_config.url))
            self._sources[source_config.camera_id] = source
            classifier = self.models.classifier
            self._analyzers[source_config.camera_id] = CameraAnalyzer(
                source_config.camera_id,
                self.config.tracker,
                classifier.classes,
                classifier.model_id,
                self.publisher,
                self.metrics,
                self.failures,
                detection_interval=self.config.detector.interval,
                priors=self._priors,
                abstain_below=self.config.events.abstain_below,
            )
        source.start()
        log.info("camera %s: added (%s)", source_config.camera_id, source_config.url)

    def remove_camera(self, camera_id: str, *, forget_series: bool = True) -> None:
        """Stop the camera; its metric series go too unless ``forget_series`` is False."""
        with self._lock:
            source = self._sources.pop(camera_id)
            analyzer = self._analyzers.pop(camera_id)
        source.stop()
        analyzer.close(forget_series)
        self.failures.forget_camera(camera_id)
        log.info("camera %s: removed", camera_id)

    def statuses(self) -> list[SourceStatus]:
        with self._lock:
            sources = list(self._sources.values())
        return [source.status() for source in sources]

    # -- processing ----------------------------------------------------------------------
    def run(self, max_seconds: float | None = None) -> None:
        """Process until stopped, until every source has finished, or for ``max_seconds``."""
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        while not self._stop.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                break
            frames = self._collect_ready_frames()
            if frames:
                self.process(frames)
                continue
            with self._lock:
                if self._sources and all(source.finished for source in self._sources.values()):
                    break
            self._stop.wait(IDLE_WAIT_S)

    def stop(self) -> None:
        self._stop.set()

    def stop_sources(self, timeout_s: float = SOURCE_STOP_S) -> list[str]:
        """Shutdown's first step: stop every camera's decoding at once (the cameras stay listed,
        with their statuses, until ``close``); returns those still stopping after ``timeout_s``."""
        with self._lock:
            sources = dict(self._sources)
        return stop_cameras(((camera_id, source.stop) for camera_id, source in sources.items()), timeout_s)

    def close(self) -> None:
        self.stop()
        self.stop_sources()  # all at once first: removing them one by one would wait for each in turn
        for camera_id in [status.camera_id for status in self.statuses()]:
            # Shutting down is not removing: the series stay for the last scrape and the exit summary.
            self.remove_camera(camera_id, forget_series=False)
        self.publisher.close()

    def _collect_ready_frames(self) -> list[VideoFrame]:
        with self._lock:
            sources = list(self._sources.values())
        frames = [frame for frame in (source.read(timeout=0.0) for source in sources) if frame is not None]
        if frames or not sources:
            return frames
        # Nothing ready: block briefly on the first source so an idle loop does not spin.
        frame = sources[0].read(timeout=IDLE_WAIT_S)
        return [frame] if frame is not None else []

    def process(self, frames: Sequence[VideoFrame]) -> dict[str, list[ExpressionEvent]]:
        """Detect, classify, track and publish one batch of frames (at most one per camera).

        A frame a model fails on is counted in ``frames_failed_total{camera,stage}`` and left
        out; the other frames of the batch go on (``pipeline.isolation``).
        """
        stage = self.metrics.stage_latency
        to_detect, found_in = self._by_detection_schedule(frames)
        if to_detect:
            started = time.perf_counter()
            detected = call_per_unit(self._detect, [[frame] for frame in to_detect], self._alone(to_detect, "detect"))
            stage.labels(stage="detect").observe(time.perf_counter() - started)
            self.metrics.batch_size.labels(stage="detect").observe(len(to_detect))
            for frame, result in zip(to_detect, detected, strict=True):
                if isinstance(result, UnitFailure):
                    self.failures.record(frame.camera_id, "detect", frame.frame_index, result.error)
                else:
                    self.metrics.faces_detected.labels(camera=frame.camera_id).inc(len(result[0]))
                    found_in.append((frame, result[0]))
        crops_of: list[tuple[VideoFrame, list[FaceDetection], list[np.ndarray]]] = []
        for frame, found in found_in:
            try:
                crops_of.append((frame, found, crop_faces(frame.image, found, self.models.classifier.metadata, self.models.face_margin)))
            except Exception as error:
                self.failures.record(frame.camera_id, "classify", frame.frame_index, error)
        started = time.perf_counter()
        classified = call_per_unit(
            self.models.classifier.predict,
            [crops for _frame, _found, crops in crops_of],
            self._alone([frame for frame, _found, _crops in crops_of], "classify"),
        )
        crop_count = sum(len(crops) for _frame, _found, crops in crops_of)
        if crop_count:
            stage.labels(stage="classify").observe(time.perf_counter() - started)
            self.metrics.batch_size.labels(stage="classify").observe(crop_count)

        published: dict[str, list[ExpressionEvent]] = {}
        classes = len(self.models.classifier.classes)
        for (frame, found, _crops), rows in zip(crops_of, classified, strict=True):
            if isinstance(rows, UnitFailure):
                self.failures.record(frame.camera_id, "classify", frame.frame_index, rows.error)
                continue
            probabilities = np.stack(rows) if rows else np.zeros((0, classes), np.float32)
            try:
                published[frame.camera_id] = self._finish_frame(frame, found, probabilities)
            except Exception as error:
                # on_events (the caller's) failed: the frame's events are published already.
                self.failures.log.error(
                    (frame.camera_id, "on_events"),
                    "camera %s: handling frame %d's events failed",
                    frame.camera_id,
                    frame.frame_index,
                    exc_info=error,
                )
        return published

    def _by_detection_schedule(self, frames: Sequence[VideoFrame]) -> tuple[list[VideoFrame], list[tuple[VideoFrame, list[FaceDetection]]]]:
        """The frames due for detection, and the others with their tracks' carried boxes (``detector.interval``)."""
        with self._lock:
            analyzers = [self._analyzers.get(frame.camera_id) for frame in frames]
        to_detect, carried = [], []
        for frame, analyzer in zip(frames, analyzers, strict=True):
            if analyzer is None or analyzer.detection_due():
                to_detect.append(frame)
            else:
                carried.append((frame, analyzer.carried_detections()))
        return to_detect, carried

    def _alone(self, frames: Sequence[VideoFrame], stage: str) -> set[int]:
        """The frames of cameras that failed this stage a moment ago: called on their own, not in the batch."""
        return {index for index, frame in enumerate(frames) if self.failures.recently_failed(frame.camera_id, stage)}

    def _detect(self, frames: list[VideoFrame]) -> list[list[FaceDetection]]:
        return detect_frames(self.models.detector, [frame.image for frame in frames], self.models.detection_size)

    def _finish_frame(self, frame: VideoFrame, detections: Sequence[FaceDetection], probabilities: np.ndarray) -> list[ExpressionEvent]:
        with self._lock:
            analyzer = self._analyzers.get(frame.camera_id)
        if analyzer is None:  # removed while its frame was in flight
            return []
        published = analyzer.analyze(frame, detections, probabilities)
        if self.on_events is not None and published:
            self.on_events(frame.camera_id, published)
        return published
