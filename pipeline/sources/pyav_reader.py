"""The PyAV (FFmpeg) frame reader: local files, RTSP/RTSPS cameras and HTTP(S)/HLS streams.

How a stalled stream is interrupted (verified with PyAV 18.1 / FFmpeg 8):

* PyAV's ``timeout=(open, read)`` installs an FFmpeg interrupt callback. FFmpeg polls it every
  ~100 ms while it waits on a socket, so a silent server makes ``av.open`` or the next packet
  read fail with ``av.error.ExitError`` after the timeout. The read timeout is the watchdog.
* The protocol options (``timeout`` for RTSP, ``rw_timeout`` for HTTP) are a second line of
  defence at the socket level.
* Packets that arrive but never decode into a frame are yielded as ``None``, for the camera's
  no-frame watchdog.
* Closing the container from another thread while the decode thread is inside
  ``av_read_frame`` is a use-after-free: it segfaulted the interpreter in the experiment. So the
  decode thread is the only one that ever touches its container (``FrameReader``'s first rule),
  and a thread blocked in network I/O notices a stop within the open/watchdog timeout.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import av
import av.error

from pipeline.config import SourceConfig
from pipeline.sources.reader import DecodedFrame, ReadIssue, SourceOpenError, StreamBroken, StreamItem
from pipeline.url_policy import local_path, protocol_whitelist, redact_url, url_scheme

log = logging.getLogger("ferstream.sources")

# A damaged file can fail to demux a few times in a row while FFmpeg resyncs; past this we
# treat the rest of the file as unreadable instead of spinning on it.
MAX_CONSECUTIVE_DEMUX_ERRORS = 16

Opener = Callable[..., Any]  # av.open's signature; injectable so tests can fake containers


def _describe(error: BaseException) -> str:
    # FFmpeg errors carry a clean strerror ("No such file or directory"); their str() repeats the URL.
    strerror = getattr(error, "strerror", None)
    return str(strerror) if strerror else (str(error) or type(error).__name__)


def ffmpeg_options(config: SourceConfig) -> dict[str, str]:
    """The FFmpeg options for opening ``config.url``: its protocol whitelist and socket timeouts."""
    scheme = url_scheme(config.url)
    socket_timeout_us = str(int(config.watchdog_timeout_s * 1_000_000))
    # Only this scheme's protocols, for the open and every nested one (pipeline/url_policy.py).
    options = {"protocol_whitelist": protocol_whitelist(config.url)}
    if scheme in ("rtsp", "rtsps"):
        # "timeout" is the RTSP socket I/O timeout in FFmpeg >= 5 (it replaced "stimeout").
        options.update(rtsp_transport=config.transport, timeout=socket_timeout_us)
    elif scheme in ("http", "https"):
        # Generic AVIO read/write timeout; also applies to HLS playlist and segment fetches.
        options.update(rw_timeout=socket_timeout_us)
    return options


class PyAVFrameReader:
    """Opens sources with ``av.open``; ``opener`` replaces it (tests)."""

    def __init__(self, opener: Opener | None = None) -> None:
        self._opener: Opener = opener if opener is not None else av.open

    def open(self, config: SourceConfig) -> PyAVStream:
        display_url = redact_url(config.url)
        target = local_path(config.url) if config.is_file else config.url
        try:
            # (open, read) timeouts: the read timeout is the watchdog for a stream that goes silent.
            container = self._opener(
                target, mode="r", options=ffmpeg_options(config), timeout=(config.open_timeout_s, config.watchdog_timeout_s)
            )
        except (av.error.FFmpegError, OSError, ValueError) as error:
            # ExitError here means PyAV's interrupt callback cut the open short.
            reason = f"no answer within {config.open_timeout_s:g}s" if isinstance(error, av.error.ExitError) else _describe(error)
            raise SourceOpenError(f"cannot open {display_url}: {reason}") from None
        if not container.streams.video:
            _close(container, config.camera_id)
            raise SourceOpenError(f"cannot open {display_url}: no video stream")
        return PyAVStream(container, config, display_url)


def _close(container: Any, camera_id: str) -> None:
    try:
        container.close()
    except Exception as error:  # closing must never mask what happened while decoding
        log.debug("camera %s: error closing container: %s", camera_id, error)


class PyAVStream:
    """One open container's first video stream."""

    def __init__(self, container: Any, config: SourceConfig, display_url: str) -> None:
        self._container = container
        self._config = config
        self._display_url = display_url
        self._stream = container.streams.video[0]
        rate = self._stream.average_rate or self._stream.guessed_rate
        self.frame_interval_s = float(1 / rate) if rate else None

    def items(self) -> Iterator[StreamItem]:
        """Demux and decode until EOF; every packet yields at least once, so the camera can stop between packets."""
        container, stream, display_url = self._container, self._stream, self._display_url
        packets: Iterator[Any] = container.demux(stream)
        demux_errors_in_a_row = 0
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                return
            except (av.error.ExitError, av.error.TimeoutError) as error:
                # ExitError: PyAV's interrupt callback fired (read timeout = watchdog);
                # TimeoutError: the protocol's own rw_timeout / timeout option.
                raise StreamBroken(
                    "stall", f"no data from {display_url} for {self._config.watchdog_timeout_s:g}s ({_describe(error)})"
                ) from None
            except (av.error.FFmpegError, OSError) as error:
                message = f"demux error on {display_url}: {_describe(error)}"
                if not self._config.is_file:
                    raise StreamBroken("decode", message) from None
                yield ReadIssue("decode", message)
                # A damaged file: a new demux generator resumes reading where FFmpeg resyncs
                # (reopening would start over and repeat frames).
                demux_errors_in_a_row += 1
                if demux_errors_in_a_row >= MAX_CONSECUTIVE_DEMUX_ERRORS:
                    log.error("camera %s: giving up on the rest of %s after repeated demux errors", self._config.camera_id, display_url)
                    return
                packets = container.demux(stream)
                continue
            demux_errors_in_a_row = 0

            decode_started = time.perf_counter()
            try:
                frames = packet.decode()
            except av.error.FFmpegError as error:
                # Corrupt H.264 (lost packets, damaged bytes): skip the packet, the decoder
                # recovers at the next keyframe at the latest.
                yield ReadIssue("decode", f"decode error on {display_url}: {_describe(error)}")
                frames = []

            for av_frame in frames:
                yield DecodedFrame(
                    pts_s=float(av_frame.time) if av_frame.time is not None else None,
                    width=av_frame.width,
                    height=av_frame.height,
                    decode_started=decode_started,
                    to_bgr=functools.partial(av_frame.to_ndarray, format="bgr24"),
                )
                # The next frame's decode time starts when the camera is done with this one.
                decode_started = time.perf_counter()
            if not frames:
                yield None

    def close(self) -> None:
        _close(self._container, self._config.camera_id)
