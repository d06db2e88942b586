"""The ``FrameReader`` interface: what a ``CameraSource`` needs from a video library.

A reader opens one source (``open(config)``) and returns an ``OpenStream``; the camera iterates its
``items()`` on its decode thread until the items end (the end of a file, a server closing a stream),
the stream breaks, or the camera stops, and then calls ``close()``. Everything else a camera does,
the state machine, reconnects and backoff, the fps limit, the no-frame watchdog, the freshest-frame
slot and the metrics, is the camera's (``pipeline/sources/camera.py``), the same for every reader.

Rules for an implementation:

* Only the camera's decode thread calls a stream's methods; ``close()`` is called once, always.
* A reader that can block (network I/O) bounds every wait by ``config.open_timeout_s`` (opening) and
  ``config.watchdog_timeout_s`` (reading): ``CameraSource.stop()`` can only ask the thread to stop.
* Errors carry a complete message that names the URL through ``redact_url`` (never the credentials):
  ``SourceOpenError`` when the source cannot be opened, ``StreamBroken`` when the stream cannot go
  on (the camera reconnects), a yielded ``ReadIssue`` when a part was lost but reading goes on.
* ``items()`` yields ``None`` for a unit of input that gave no frame (a packet that did not decode
  into one): the camera's watchdog reconnects a stream whose input keeps coming with no frame in it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from pipeline.config import SourceConfig


@dataclass(frozen=True)
class DecodedFrame:
    """A decoded frame before colour conversion. The camera converts only the frames its fps limit
    and size limit admit (``to_bgr``), since the conversion is the expensive part."""

    pts_s: float | None  # presentation time in the opened stream's clock; None when the container has none
    width: int
    height: int
    decode_started: float  # time.perf_counter() when decoding this frame began: the decode stage latency starts here
    to_bgr: Callable[[], np.ndarray]  # H x W x 3 uint8, BGR (OpenCV order)


@dataclass(frozen=True)
class ReadIssue:
    """Part of the input was lost (a corrupt packet, a damaged stretch of a file), reading goes on.
    Counted as ``ferstream_decode_errors_total{kind}`` and shown as the camera's ``last_error``."""

    kind: str
    message: str


# What an open stream yields: a frame, an issue, or None for input that gave no frame.
StreamItem = DecodedFrame | ReadIssue | None


class SourceOpenError(Exception):
    """The source could not be opened (missing file, refused connection, no video in it); the camera retries
    as ``max_reconnects`` allows. The message names the URL redacted."""


class StreamBroken(Exception):
    """The open stream cannot go on (no data within the watchdog timeout, a demux error on a live stream);
    the camera closes it and reconnects. ``kind`` is the ``decode_errors_total`` label."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class OpenStream(Protocol):
    """One opened source."""

    @property
    def frame_interval_s(self) -> float | None:
        """The nominal time between frames, None when the stream does not say; fills in missing PTS."""
        ...

    def items(self) -> Iterator[StreamItem]:
        """Decoded frames in presentation order, with issues and no-frame marks between them.
        Ends at the end of the input; raises ``StreamBroken`` when the stream cannot go on."""
        ...

    def close(self) -> None: ...


class FrameReader(Protocol):
    """Opens sources of the URL schemes it is registered for (``pipeline/sources/readers.py``)."""

    def open(self, config: SourceConfig) -> OpenStream:
        """Open ``config.url``, or raise ``SourceOpenError`` saying why not."""
        ...
