"""A ``FrameReader`` without a video library, for the camera's unit tests.

Each ``open()`` plays the next scripted ``Connection``: an open failure, or a list of steps (frames
whose pixels carry their marker, read issues, stretches of input with no frame, a broken stream, a
bug). Once the script is used up every open fails. The reader counts opens, closes and BGR
conversions so that tests can check what the camera asked of it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from pipeline.config import SourceConfig
from pipeline.sources.reader import DecodedFrame, ReadIssue, SourceOpenError, StreamBroken, StreamItem
from pipeline.url_policy import redact_url


@dataclass(frozen=True)
class Frame:
    marker: int  # every pixel of the image is marker % 256, so a test can tell frames apart
    pts_s: float | None
    size: tuple[int, int] = (8, 6)  # width, height


@dataclass(frozen=True)
class NoFrame:
    """Input that decodes into no frame, for ``seconds`` (one ``None`` item every 10 ms); 0: one item."""

    seconds: float = 0.0


@dataclass(frozen=True)
class Break:
    kind: str = "stall"
    message: str = "no data"


@dataclass(frozen=True)
class Crash:
    """A bug in the reader: an exception that is not part of the interface."""

    message: str = "bug in the reader"


Step = Frame | ReadIssue | NoFrame | Break | Crash


@dataclass(frozen=True)
class Connection:
    steps: Sequence[Step] = ()
    open_error: str | None = None  # the open fails with this reason
    frame_interval_s: float | None = 1 / 25


def frames(count: int, *, fps: float = 25.0, first: int = 0, size: tuple[int, int] = (8, 6)) -> list[Frame]:
    """``count`` frames at ``fps``, markers and PTS counting from ``first``."""
    return [Frame(marker, marker / fps, size) for marker in range(first, first + count)]


def marker_of(image: np.ndarray) -> int:
    return int(image[0, 0, 0])


@dataclass
class SyntheticReader:
    connections: Sequence[Connection]
    opens: int = 0  # open() calls, failed ones included
    closes: int = 0
    conversions: int = 0  # to_bgr() calls
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def open(self, config: SourceConfig) -> SyntheticStream:
        with self._lock:
            index = self.opens
            self.opens += 1
        if index >= len(self.connections):
            raise SourceOpenError(f"cannot open {redact_url(config.url)}: no more connections scripted")
        connection = self.connections[index]
        if connection.open_error is not None:
            raise SourceOpenError(f"cannot open {redact_url(config.url)}: {connection.open_error}")
        return SyntheticStream(self, connection)

    def _converted(self) -> None:
        with self._lock:
            self.conversions += 1

    def _closed(self) -> None:
        with self._lock:
            self.closes += 1


class SyntheticStream:
    def __init__(self, reader: SyntheticReader, connection: Connection) -> None:
        self._reader = reader
        self._connection = connection
        self.frame_interval_s = connection.frame_interval_s

    def items(self) -> Iterator[StreamItem]:
        for step in self._connection.steps:
            if isinstance(step, Frame):
                yield DecodedFrame(step.pts_s, step.size[0], step.size[1], time.perf_counter(), self._converter(step))
            elif isinstance(step, ReadIssue):
                yield step
            elif isinstance(step, NoFrame):
                until = time.monotonic() + step.seconds
                yield None
                while time.monotonic() < until:
                    time.sleep(0.01)
                    yield None
            elif isinstance(step, Break):
                raise StreamBroken(step.kind, step.message)
            else:
                raise RuntimeError(step.message)

    def _converter(self, step: Frame) -> Callable[[], np.ndarray]:
        def to_bgr() -> np.ndarray:
            self._reader._converted()
            width, height = step.size
            return np.full((height, width, 3), step.marker % 256, np.uint8)

        return to_bgr

    def close(self) -> None:
        self._reader._closed()
