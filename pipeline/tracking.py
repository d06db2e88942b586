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
    box: Box
    probabilities: np.ndarray
    hits: int = 1
    missed: int = 0


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

    @property
    def active_track_ids(self) -> list[int]:
        return sorted(self._tracks)

    def update(self, detections: Sequence[FaceDetection], probabilities: np.ndarray) -> TrackUpdate:
        """Associate this frame's detections (with their raw probabilities) to tracks."""
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
                track = Track(track_id=self._next_id, box=detection.box, probabilities=raw.copy())
                self._tracks[track.track_id] = track
                self._next_id += 1
            else:
                track = self._tracks[track_id]
                track.box = detection.box
                track.probabilities = alpha * raw + (1.0 - alpha) * track.probabilities
                track.hits += 1
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
