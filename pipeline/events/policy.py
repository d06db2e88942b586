"""The emission policy: which processed faces become events."""

from __future__ import annotations

import dataclasses
import threading
from typing import Literal

from pipeline.config import EventsConfig
from pipeline.events.record import ExpressionEvent


@dataclasses.dataclass
class _TrackState:
    emotion: str
    emitted_at: float
    seen_at: float


class EmissionPolicy:
    """Which processed faces become events.

    ``every_face``: all of them. ``on_change``: a track is emitted when it is new, when its
    top emotion differs from the last one emitted, and otherwise at most every
    ``heartbeat_s`` so consumers can tell "unchanged" from "gone".

    ``on_change`` keeps one small record per live track. Callers drop ended tracks with
    ``forget``/``forget_camera``; as a safety net, a track not seen for ``idle_expiry_s``
    is dropped too (it is simply treated as new if it comes back), so memory stays bounded
    even if an end is never reported.
    """

    def __init__(
        self, mode: Literal["every_face", "on_change"] = "every_face", heartbeat_s: float = 5.0, idle_expiry_s: float | None = None
    ) -> None:
        if mode not in ("every_face", "on_change"):
            raise ValueError(f"unknown emission policy {mode!r}; use 'every_face' or 'on_change'")
        if heartbeat_s <= 0:
            raise ValueError("heartbeat_s must be > 0")
        self.mode = mode
        self.heartbeat_s = heartbeat_s
        self.idle_expiry_s = idle_expiry_s if idle_expiry_s is not None else max(60.0, 10 * heartbeat_s)
        self._tracks: dict[str, dict[int, _TrackState]] = {}
        # publish() may be called from several camera threads.
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: EventsConfig) -> EmissionPolicy:
        return cls(config.policy, config.heartbeat_s)

    def select(self, camera_id: str, events: list[ExpressionEvent], now: float) -> list[ExpressionEvent]:
        """The events of one frame that should be emitted; ``now`` is any monotonic-ish clock in seconds."""
        if self.mode == "every_face":
            return list(events)
        selected = []
        with self._lock:
            tracks = self._tracks.setdefault(camera_id, {})
            for event in events:
                state = tracks.get(event.track_id)
                if state is None:
                    tracks[event.track_id] = _TrackState(event.emotion, now, now)
                    selected.append(event)
                    continue
                state.seen_at = now
                if event.emotion != state.emotion or now - state.emitted_at >= self.heartbeat_s:
                    state.emotion, state.emitted_at = event.emotion, now
                    selected.append(event)
            stale = [track_id for track_id, state in tracks.items() if now - state.seen_at > self.idle_expiry_s]
            for track_id in stale:
                del tracks[track_id]
        return selected

    def forget(self, camera_id: str, track_id: int) -> None:
        with self._lock:
            tracks = self._tracks.get(camera_id)
            if tracks is not None:
                tracks.pop(track_id, None)
                if not tracks:
                    del self._tracks[camera_id]

    def forget_camera(self, camera_id: str) -> None:
        with self._lock:
            self._tracks.pop(camera_id, None)

    def tracked(self, camera_id: str | None = None) -> int:
        """How many tracks the policy holds state for (one camera, or all)."""
        with self._lock:
            if camera_id is not None:
                return len(self._tracks.get(camera_id, {}))
            return sum(len(tracks) for tracks in self._tracks.values())
