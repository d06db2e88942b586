"""What a camera source hands out: decoded frames, its stream state and its status.

Plain records with no PyAV (or any decoder) behind them, so the analysis, the registry, the
Controller and the exit codes can use them without loading a video library. The camera that
produces them is ``pipeline/sources/camera.py``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)  # eq=False: comparing image arrays with == is ambiguous
class VideoFrame:
    """One decoded frame. ``image`` is shared, not copied: consumers must not modify it in place."""

    camera_id: str
    frame_index: int  # counts every decoded frame of this source, dropped ones too; never resets
    pts_s: float  # presentation time in seconds, strictly increasing across reconnects and loops
    capture_time: float  # wall clock (time.time()) when the frame was decoded / released
    image: np.ndarray  # H x W x 3 uint8, BGR (OpenCV order)


class StreamState(str, enum.Enum):
    CONNECTING = "connecting"
    STREAMING = "streaming"
    RECONNECTING = "reconnecting"
    ENDED = "ended"  # a file reached its end (and loop is off)
    FAILED = "failed"  # gave up after max_reconnects
    STOPPED = "stopped"  # stop() was called


@dataclass(frozen=True)
class SourceStatus:
    camera_id: str
    url: str
    state: StreamState
    measured_fps: float  # frames handed out by read() per second, over the camera's rate window (RATE_WINDOW_S)
    decoded_fps: float  # frames decoded per second, over the same window
    last_frame_time: float | None  # wall clock of the last decoded frame
    reconnects: int
    frames_decoded: int
    frames_dropped: int
    last_error: str | None
