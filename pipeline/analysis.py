"""The per-camera path after the models: tracking, event construction, publishing, camera removal.

The single-process runner and the Serve ingest replicas differ only in how frames reach the
models (one in-process batch across cameras, or one request per frame and face to the model
deployments). What happens to a frame's detections and probabilities afterwards is the same
and lives here, once: the tracker, the events built from its tracks, the ``track`` stage
latency and ``classifications`` counter, the emission policy's bookkeeping of ended tracks,
the publish, and what removing a camera must undo. Also per camera, before the tracker: the class
prior adjustment (``pipeline.priors``, off by default); after it: abstaining (``events.abstain_below``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np

from pipeline.config import TrackerConfig
from pipeline.detection import FaceDetection
from pipeline.events import UNCERTAIN, EventPublisher, ExpressionEvent, new_run_id
from pipeline.frames import VideoFrame
from pipeline.isolation import FrameFailures
from pipeline.metrics import PipelineMetrics
from pipeline.priors import PriorSettings
from pipeline.tracking import IoUTracker, TrackedFace

log = logging.getLogger("ferstream.analysis")


class CameraAnalyzer:
    """One camera after the models: its tracks, its events, and their publishing.

    ``analyze`` is called from one thread per camera (the runner's loop or the camera's Serve
    session); the publisher and metrics it shares with the other cameras are thread-safe.
    """

    def __init__(
        self,
        camera_id: str,
        tracker_config: TrackerConfig,
        classes: Sequence[str],
        model_id: str,
        publisher: EventPublisher,
        metrics: PipelineMetrics,
        failures: FrameFailures | None = None,
        run_id: str | None = None,
        detection_interval: int = 1,
        priors: PriorSettings | None = None,
        abstain_below: float | None = None,
    ) -> None:
        if abstain_below is not None and UNCERTAIN in classes:
            raise ValueError(f"events.abstain_below: the model has a class named {UNCERTAIN!r}, which abstaining would hide")
        self.camera_id = camera_id
        self.detection_interval = detection_interval
        self._frames_until_detection = 0
        self._next_frame_carried = False
        # One analyzer per start of the camera, so a new run_id per start: frame_index and track_id
        # start again with the run, and (camera_id, run_id, frame_index, track_id) stays unique.
        self.run_id = run_id if run_id is not None else new_run_id()
        self.tracker = IoUTracker(tracker_config)
        self.classes = tuple(classes)
        self.model_id = model_id
        self.publisher = publisher
        self.metrics = metrics
        self.failures = failures if failures is not None else FrameFailures(metrics, log)
        # Per camera: the online estimate follows this camera's faces only.
        self.prior_adjuster = priors.new_adjuster() if priors is not None else None
        self.abstain_below = abstain_below

    def detection_due(self) -> bool:
        """Whether this camera's next processed frame goes through the detector (every
        ``detection_interval``-th frame); call it once per frame. A frame without detection uses
        :meth:`carried_detections`."""
        due = self._frames_until_detection == 0
        self._frames_until_detection = (self._frames_until_detection - 1) % self.detection_interval
        self._next_frame_carried = not due
        return due

    def carried_detections(self) -> list[FaceDetection]:
        return self.tracker.carried_detections()

    def analyze(self, frame: VideoFrame, detections: Sequence[FaceDetection], probabilities: np.ndarray) -> list[ExpressionEvent]:
        """Track one frame's faces and publish their events; returns the events the policy emitted.

        Never raises: a frame the tracker or the publisher fails on is counted in
        ``frames_failed_total{stage="track"|"publish"}`` and yields no events.
        """
        started = time.perf_counter()
        try:
            if self.prior_adjuster is not None:
                # Before the tracker: the smoothing, and so the event, is of the adjusted probabilities.
                probabilities = self.prior_adjuster.adjust(probabilities)
            update = self.tracker.update(detections, probabilities, carried=self._next_frame_carried)
            events = [self._event(frame, face) for face in update.faces]
        except Exception as error:
            self.failures.record(self.camera_id, "track", frame.frame_index, error)
            return []
        self.metrics.stage_latency.labels(stage="track").observe(time.perf_counter() - started)
        for event in events:
            self.metrics.classifications.labels(camera=self.camera_id, emotion=event.emotion).inc()
        try:
            # An ended track never comes back (ids are not reused), so its policy state is garbage.
            for track_id in update.ended_track_ids:
                self.publisher.policy.forget(self.camera_id, track_id)
            return self.publisher.publish(self.camera_id, events)
        except Exception as error:
            self.failures.record(self.camera_id, "publish", frame.frame_index, error)
            return []

    def close(self, forget_series: bool = True) -> None:
        """The camera was removed: drop its policy state and its metric series (``forget_series``
        False: only mark its stream down, for a shutdown whose last scrape or summary still reads them)."""
        self.publisher.policy.forget_camera(self.camera_id)
        if forget_series:
            self.metrics.forget_camera(self.camera_id)
        else:
            self.metrics.stream_up.labels(camera=self.camera_id).set(0)

    def _event(self, frame: VideoFrame, face: TrackedFace) -> ExpressionEvent:
        top = int(np.argmax(face.probabilities))
        confidence = float(face.probabilities[top])
        abstained = self.abstain_below is not None and confidence < self.abstain_below
        x1, y1, x2, y2 = face.detection.box
        return ExpressionEvent(
            camera_id=self.camera_id,
            run_id=self.run_id,
            frame_index=frame.frame_index,
            pts_s=frame.pts_s,
            capture_time=frame.capture_time,
            track_id=face.track_id,
            box=(round(x1), round(y1), round(x2), round(y2)),
            detector_score=face.detection.score,
            emotion=UNCERTAIN if abstained else self.classes[top],
            confidence=confidence,
            probabilities={name: float(p) for name, p in zip(self.classes, face.probabilities, strict=True)},
            model_id=self.model_id,
        )
