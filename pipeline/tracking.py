"""Per-camera IoU tracking and per-track smoothing of expression probabilities.

Greedy IoU association is what Frigate-style deployments use for slow-moving faces at a few
frames a second: cheap, deterministic, and good enough when boxes overlap frame to frame.
The exponential moving average keeps labels from flickering between neighbouring classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from pipeline.config import TrackerConfig
from pipeline.detection import Box, FaceDetection


def iou(a: Box, b: Box) -> float:
    inter_w = min(a[2], b[2]) - max(a[0], b[0])
    inter_h = min(a[3], b[3]) - max(a[1], b[1])
    if inter_w <= 0 or inter_h <= 0:
        return 0.0
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@dataclass
class Track:
    track_id: int
    detection: FaceDetection
    probabilities: np.ndarray
    missed: int = 0
    velocity: tuple[float, float] = (0.0, 0.0)  # box centre, pixels per frame, between the last two detections
    detected_box: Box | None = None  # the last box the detector gave (not a carried one)
    frames_since_detected: int = 0

    @property
    def box(self) -> Box:
        return self.detection.box


@dataclass(frozen=True)
class TrackedFace:
    track_id: int
    detection: FaceDetection
    probabilities: np.ndarray  # smoothed


@dataclass
class TrackUpdate:
    faces: list[TrackedFace]
    ended_track_ids: list[int] = field(default_factory=list)


class IoUTracker:
    """Tracks faces of one camera. Track ids are unique per camera and never reused."""

    def __init__(self, config: TrackerConfig) -> None:
        self.config = config
        self._tracks: dict[int, Track] = {}
        self._next_id = 1

    def update(self, detections: Sequence[FaceDetection], probabilities: np.ndarray, carried: bool = False) -> TrackUpdate:
        """Associate this frame's detections (with their raw probabilities) to tracks. ``carried``: the
        detections are :meth:`carried_detections` (a frame without detection), so they teach no velocity."""
        if len(detections) != len(probabilities):
            raise ValueError(f"{len(detections)} detections but {len(probabilities)} probability rows")
        matches = self._match(detections)
        alpha = self.config.ema_alpha
        faces: list[TrackedFace] = []
        matched_tracks: set[int] = set()
        for index, detection in enumerate(detections):
            raw = np.asarray(probabilities[index], dtype=np.float32)
            track_id = matches.get(index)
            if track_id is None:
                track = Track(track_id=self._next_id, detection=detection, probabilities=raw.copy(), detected_box=detection.box)
                self._tracks[track.track_id] = track
                self._next_id += 1
            else:
                track = self._tracks[track_id]
                track.frames_since_detected += 1
                if not carried:
                    # Per frame over the frames since the last detection (detector.interval carries boxes between).
                    dx, dy = _centre_shift(track.detected_box or track.box, detection.box)
                    track.velocity = (dx / track.frames_since_detected, dy / track.frames_since_detected)
                    track.detected_box, track.frames_since_detected = detection.box, 0
                track.detection = detection
                track.probabilities = alpha * raw + (1.0 - alpha) * track.probabilities
                track.missed = 0
            matched_tracks.add(track.track_id)
            faces.append(TrackedFace(track_id=track.track_id, detection=detection, probabilities=track.probabilities.copy()))
        ended = []
        for track_id, track in list(self._tracks.items()):
            if track_id in matched_tracks:
                continue
            track.missed += 1
            if track.missed > self.config.max_missed_frames:
                del self._tracks[track_id]
                ended.append(track_id)
        return TrackUpdate(faces=faces, ended_track_ids=ended)

    def carried_detections(self) -> list[FaceDetection]:
        """Where the faces seen in the last frame are now, for a frame without detection: each box (and its
        landmarks) moved on by its track's last velocity. A face that was not seen last frame is not carried."""
        return [_shifted(track.detection, track.velocity) for track in self._tracks.values() if track.missed == 0]

    def _match(self, detections: Sequence[FaceDetection]) -> dict[int, int]:
        """Greedy: the highest-IoU pair first, each track and detection used once."""
        pairs = []
        for index, detection in enumerate(detections):
            for track_id, track in self._tracks.items():
                overlap = iou(detection.box, track.box)
                if overlap >= self.config.iou_threshold:
                    pairs.append((overlap, index, track_id))
        pairs.sort(key=lambda pair: pair[0], reverse=True)
        matches: dict[int, int] = {}
        used_tracks: set[int] = set()
        for _overlap, index, track_id in pairs:
            if index in matches or track_id in used_tracks:
                continue
            matches[index] = track_id
            used_tracks.add(track_id)
        return matches


def _centre_shift(old: Box, new: Box) -> tuple[float, float]:
    return ((new[0] + new[2] - old[0] - old[2]) / 2.0, (new[1] + new[3] - old[1] - old[3]) / 2.0)


def _shifted(detection: FaceDetection, shift: tuple[float, float]) -> FaceDetection:
    dx, dy = shift
    x1, y1, x2, y2 = detection.box
    landmarks = None if detection.landmarks is None else tuple((x + dx, y + dy) for x, y in detection.landmarks)
    return FaceDetection(box=(x1 + dx, y1 + dy, x2 + dx, y2 + dy), score=detection.score, landmarks=landmarks)
