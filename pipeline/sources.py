"""Camera ingestion: one decode thread per camera, built on PyAV.

A ``CameraSource`` opens a local file, an RTSP/RTSPS camera or an HTTP(S)/HLS stream, decodes
every frame on a daemon thread and hands the freshest one to ``read()``. The consumer (face
detection) is usually slower than the camera, so the hand-over is a one-slot buffer: a new
frame replaces an unread one instead of queueing behind it, and latency never builds up.

Failure handling is an explicit state machine (``StreamState``)::

    CONNECTING -> STREAMING -> (ENDED | RECONNECTING | STOPPED)
         |                          |
         +--> RECONNECTING ---------+--> CONNECTING ... -> FAILED after max_reconnects

How a stalled stream is interrupted (verified with PyAV 18.1 / FFmpeg 8):

* PyAV's ``timeout=(open, read)`` installs an FFmpeg interrupt callback. FFmpeg polls it every
  ~100 ms while it waits on a socket, so a silent server makes ``av.open`` or the next packet
  read fail with ``av.error.ExitError`` after the timeout. The read timeout is the watchdog.
* The protocol options (``timeout`` for RTSP, ``rw_timeout`` for HTTP) are a second line of
  defence at the socket level.
* Packets that arrive but never decode into a frame are caught by a check in the decode loop.
* Closing the container from another thread while the decode thread is inside
  ``av_read_frame`` is a use-after-free: it segfaulted the interpreter in the experiment. So the
  decode thread is the only one that ever touches its container, and ``stop()`` can only ask it
  to stop; a thread blocked in network I/O notices within the open/watchdog timeout.
"""

from __future__ import annotations

import collections
import enum
import logging
import random
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import av
import av.error
import numpy as np

from pipeline.backoff import Backoff
from pipeline.config import SourceConfig, url_scheme
from pipeline.log_limits import RepeatLimitedLog
from pipeline.metrics import PipelineMetrics
from pipeline.url_policy import local_path, protocol_whitelist

log = logging.getLogger("ferstream.sources")

# A window long enough to smooth out a bursty network, short enough to show a stall quickly.
RATE_WINDOW_S = 5.0
# A damaged file can fail to demux a few times in a row while FFmpeg resyncs; past this we
# treat the rest of the file as unreadable instead of spinning on it.
MAX_CONSECUTIVE_DEMUX_ERRORS = 16
# Realtime file pacing re-anchors instead of sleeping (or bursting) across a PTS gap this big.
MAX_PACING_GAP_S = 1.0


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


TERMINAL_STATES = frozenset({StreamState.ENDED, StreamState.FAILED, StreamState.STOPPED})

# Anything else is a bug in this module; refusing it keeps a late decode thread from reviving
# a source that stop() already finished.
_TRANSITIONS: dict[StreamState, frozenset[StreamState]] = {
    StreamState.CONNECTING: frozenset(
        {StreamState.STREAMING, StreamState.RECONNECTING, StreamState.ENDED, StreamState.FAILED, StreamState.STOPPED}
    ),
    StreamState.STREAMING: frozenset({StreamState.RECONNECTING, StreamState.ENDED, StreamState.FAILED, StreamState.STOPPED}),
    StreamState.RECONNECTING: frozenset({StreamState.CONNECTING, StreamState.FAILED, StreamState.STOPPED}),
    StreamState.ENDED: frozenset(),
    StreamState.FAILED: frozenset(),
    StreamState.STOPPED: frozenset(),
}


@dataclass(frozen=True)
class SourceStatus:
    camera_id: str
    url: str
    state: StreamState
    measured_fps: float  # frames handed out by read() per second, over the last RATE_WINDOW_S
    decoded_fps: float  # frames decoded per second, over the last RATE_WINDOW_S
    last_frame_time: float | None  # wall clock of the last decoded frame
    reconnects: int
    frames_decoded: int
    frames_dropped: int
    last_error: str | None


class _Outcome(enum.Enum):
    """Why the decode loop over one open container returned."""

    EOF = "eof"
    STALL = "stall"
    ERROR = "error"
    STOPPED = "stopped"


Opener = Callable[..., Any]  # av.open's signature; injectable so tests can fake containers


class _RateMeter:
    """Events per second over a sliding window (not thread-safe; callers hold the source lock)."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self._window_s = window_s
        self._stamps: collections.deque[float] = collections.deque()
        self._first: float | None = None

    def add(self, now: float) -> None:
        if self._first is None:
            self._first = now
        self._stamps.append(now)
        self._trim(now)

    def rate(self, now: float) -> float:
        if self._first is None:
            return 0.0
        self._trim(now)
        # Right after start the window is not full yet; dividing by it would under-report.
        span = min(self._window_s, now - self._first)
        return len(self._stamps) / span if span > 0 else 0.0

    def _trim(self, now: float) -> None:
        while self._stamps and self._stamps[0] < now - self._window_s:
            self._stamps.popleft()


class _Timeline:
    """Turns per-container PTS (missing, restarting at 0 after a reconnect or loop, or briefly
    out of order) into one strictly increasing presentation time per source."""

    def __init__(self) -> None:
        self._offset = 0.0
        self._last: float | None = None
        self._last_wall: float | None = None
        self._new_segment = True
        self._use_wall_gap = False

    def new_segment(self, use_wall_gap: bool) -> None:
        """The next frame comes from a freshly opened container: its PTS restart anywhere.
        Live streams continue after the real time that passed, files right after the last frame."""
        self._new_segment = True
        self._use_wall_gap = use_wall_gap

    def next(self, raw_s: float | None, interval_s: float | None, wall: float) -> float:
        step = interval_s if interval_s else self._wall_step(wall)
        if self._last is None:
            value = raw_s if raw_s is not None else 0.0
            self._offset = value - (raw_s or 0.0)
        elif self._new_segment:
            gap = step
            if self._use_wall_gap and self._last_wall is not None:
                gap = max(step, wall - self._last_wall)
            value = self._last + gap
            if raw_s is not None:
                self._offset = value - raw_s
        elif raw_s is None:
            value = self._last + step
        else:
            value = raw_s + self._offset
            if value <= self._last:
                # Non-monotonic PTS (broken muxer, TS discontinuity, a B-frame glitch): keep the
                # output increasing and re-anchor so the following frames keep their spacing.
                value = self._last + step
                self._offset = value - raw_s
        self._new_segment = False
        self._last = value
        self._last_wall = wall
        return value

    def _wall_step(self, wall: float) -> float:
        if self._last_wall is None:
            return 1e-3
        return max(1e-3, wall - self._last_wall)


class _FpsLimiter:
    """Admits at most ``fps`` frames per second of PTS. Due times advance by a fixed period
    rather than from the last admitted frame, so a 12.5 fps camera limited to 5 fps gets 5,
    not the 4.2 that "at least 0.2 s since the last one" would give."""

    def __init__(self, fps: float | None) -> None:
        self._period = 1.0 / fps if fps else None
        self._next_due: float | None = None

    def admit(self, pts_s: float) -> bool:
        if self._period is None:
            return True
        tolerance = self._period * 1e-3  # PTS are rationals turned into floats
        if self._next_due is None or pts_s - self._next_due > self._period:
            # First frame, or a gap (reconnect): start a fresh schedule instead of bursting.
            self._next_due = pts_s + self._period
            return True
        if pts_s >= self._next_due - tolerance:
            self._next_due += self._period
            return True
        return False


# Query parameters whose values are credentials in camera and CDN URLs (?pwd=, ?token=, signed URLs).
# A parameter is secret when its name, lower-cased, is one of these or contains one of SECRET_QUERY_PARTS.
SECRET_QUERY_NAMES = frozenset(
    {"pass", "pwd", "passwd", "password", "token", "key", "secret", "auth", "signature", "sig", "credential", "credentials", "session"}
)
SECRET_QUERY_PARTS = ("password", "passwd", "token", "secret", "signature", "apikey", "api_key", "access_key", "auth", "credential")
REDACTED = "***"
UNPARSABLE_URL = "<unparsable URL>"


def is_secret_query_parameter(name: str) -> bool:
    lowered = name.lower()
    return lowered in SECRET_QUERY_NAMES or any(part in lowered for part in SECRET_QUERY_PARTS)


def _redact_query(query: str) -> str:
    if not query:
        return query
    parts = []
    for pair in query.split("&"):
        name, equals, _value = pair.partition("=")
        parts.append(f"{name}={REDACTED}" if equals and is_secret_query_parameter(urllib.parse.unquote_plus(name)) else pair)
    return "&".join(parts)


def redact_url(url: str) -> str:
    """The URL without credentials, for logs, API responses and errors (camera URLs often carry them):
    the password in the user info and the values of secret-looking query parameters become ``***``.
    Never raises: a URL that does not parse is replaced as a whole rather than shown."""
    try:
        parsed = urllib.parse.urlsplit(url)
    except ValueError:
        return UNPARSABLE_URL
    netloc = parsed.netloc
    userinfo, at, host = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.split(':', 1)[0]}:{REDACTED}@{host}"
    elif at:
        # User info without a password is often a token in the user's place (https://<token>@host/).
        netloc = f"{REDACTED}@{host}"
    return urllib.parse.urlunsplit(parsed._replace(netloc=netloc, query=_redact_query(parsed.query)))


def url_secrets(url: str) -> list[str]:
    """The credential parts of a URL as they may appear in text: the password (or a user part
    without one), the values of secret-looking query parameters, each raw and decoded."""
    try:
        parsed = urllib.parse.urlsplit(url)
    except ValueError:
        return [url]  # no parts to tell apart: the whole URL is the secret
    secrets: list[str] = []
    userinfo, at, _host = parsed.netloc.rpartition("@")
    if at:
        user, colon, password = userinfo.partition(":")
        secrets.append(password if colon else user)
    for pair in parsed.query.split("&"):
        name, equals, value = pair.partition("=")
        if equals and is_secret_query_parameter(urllib.parse.unquote_plus(name)):
            secrets.append(value)
    decoded = [urllib.parse.unquote_plus(secret) for secret in secrets]
    return sorted({secret for secret in (*secrets, *decoded) if secret}, key=len, reverse=True)


def scrub_credentials(text: str, url: str) -> str:
    """``text`` (an error message, a status) with ``url`` shown redacted and every credential in it
    replaced by ``***``, wherever a library may have quoted it."""
    scrubbed = text.replace(url, redact_url(url)) if url else text
    for secret in url_secrets(url):
        scrubbed = scrubbed.replace(secret, REDACTED)
    return scrubbed


def _describe(error: BaseException) -> str:
    # FFmpeg errors carry a clean strerror ("No such file or directory"); their str() repeats the URL.
    strerror = getattr(error, "strerror", None)
    return str(strerror) if strerror else (str(error) or type(error).__name__)


class CameraSource:
    """One camera: decodes on a daemon thread, serves the freshest frame to ``read()``.

    ``opener`` replaces ``av.open`` (tests), ``clock`` replaces ``time.time`` for frame
    timestamps, ``rng`` makes the reconnect jitter reproducible.
    """

    def __init__(
        self,
        config: SourceConfig,
        metrics: PipelineMetrics,
        *,
        opener: Opener | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.camera_id = config.camera_id
        self._metrics = metrics
        self._opener: Opener = opener if opener is not None else av.open
        self._clock = clock
        self._backoff = Backoff(config.reconnect, rng)
        self._is_file = config.is_file
        self._display_url = redact_url(config.url)
        # Blocking the decode thread only makes sense for files: a live camera keeps sending,
        # and a paused reader would just move the backlog into socket buffers.
        self._lossless = self._is_file and not config.realtime
        self._paced = self._is_file and config.realtime
        if not self._is_file and not config.realtime:
            log.warning("camera %s: realtime=false only applies to files; a live stream is read in real time", self.camera_id)

        self._cond = threading.Condition()  # guards every field below and the slot
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None
        self._state = StreamState.CONNECTING
        self._slot: VideoFrame | None = None
        self._next_index = 0
        self._frames_decoded = 0
        self._frames_dropped = 0
        self._reconnects = 0
        self._failures_in_a_row = 0  # reconnects since frames last flowed; compared with max_reconnects
        self._last_frame_time: float | None = None
        self._last_error: str | None = None
        self._decoded_rate = _RateMeter()
        self._processed_rate = _RateMeter()
        # A corrupt stream can raise an error per packet: each kind is logged once per interval, with a count.
        self._error_log = RepeatLimitedLog(log)

        # Decode-thread-only state: no lock needed.
        self._timeline = _Timeline()
        self._limiter = _FpsLimiter(config.target_fps)
        self._pace_anchor: tuple[float, float] | None = None  # (monotonic, pts_s)
        self._last_progress = time.monotonic()
        self._segment_frames = 0  # frames decoded since the container was (re)opened

        metrics.stream_up.labels(camera=self.camera_id).set(0)

    # ----------------------------------------------------------------------------- public API

    def start(self) -> None:
        with self._cond:
            if self._thread is not None or self._state in TERMINAL_STATES:
                raise RuntimeError(f"camera {self.camera_id}: a CameraSource can only be started once")
            log.info("camera %s: starting %s", self.camera_id, self._display_url)
            self._thread = threading.Thread(target=self._run, name=f"ferstream-source-{self.camera_id}", daemon=True)
            # Started under the lock so that a concurrent stop() never joins an unstarted thread.
            self._thread.start()

    def read(self, timeout: float) -> VideoFrame | None:
        """The freshest frame not read yet; None after ``timeout`` seconds or once finished."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._cond:
            while self._slot is None:
                if self._state in TERMINAL_STATES:
                    return None
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)
            frame, self._slot = self._slot, None
            self._processed_rate.add(time.monotonic())
            # Wake a lossless (realtime=false) decode thread waiting for the slot to empty.
            self._cond.notify_all()
        self._metrics.frames_processed.labels(camera=self.camera_id).inc()
        return frame

    def stop(self, timeout: float = 5.0) -> None:
        """Stop decoding and join the thread. Idempotent. The decode thread closes its own
        container; if it is blocked in network I/O it exits within the open/watchdog timeout."""
        self._stop_event.set()
        with self._cond:
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                log.warning(
                    "camera %s: decode thread still blocked after %.1fs; it exits on its own within %.1fs",
                    self.camera_id,
                    timeout,
                    max(self.config.open_timeout_s, self.config.watchdog_timeout_s),
                )
        with self._cond:
            if self._slot is not None:
                # Nobody will read it now; count it so decoded == processed + dropped holds.
                self._slot = None
                self._count_drop("stale")
            self._set_state(StreamState.STOPPED)

    @property
    def finished(self) -> bool:
        """True once the source will never deliver another frame: ended, failed or stopped,
        and the last frame (if any) has been read."""
        with self._cond:
            return self._state in TERMINAL_STATES and self._slot is None

    @property
    def state(self) -> StreamState:
        with self._cond:
            return self._state

    def status(self) -> SourceStatus:
        now = time.monotonic()
        with self._cond:
            return SourceStatus(
                camera_id=self.camera_id,
                url=self._display_url,
                state=self._state,
                measured_fps=self._processed_rate.rate(now),
                decoded_fps=self._decoded_rate.rate(now),
                last_frame_time=self._last_frame_time,
                reconnects=self._reconnects,
                frames_decoded=self._frames_decoded,
                frames_dropped=self._frames_dropped,
                last_error=self._last_error,
            )

    # ------------------------------------------------------------------------ state and metrics

    def _set_state(self, new: StreamState) -> bool:
        """Move to ``new`` if the state machine allows it. Caller holds ``self._cond``."""
        old = self._state
        if new == old:
            return True
        if new not in _TRANSITIONS[old]:
            if old not in TERMINAL_STATES:
                log.error("camera %s: refusing state change %s -> %s", self.camera_id, old.value, new.value)
            return False
        self._state = new
        level = logging.WARNING if new in (StreamState.RECONNECTING, StreamState.FAILED) else logging.INFO
        log.log(level, "camera %s: %s -> %s", self.camera_id, old.value, new.value)
        self._metrics.stream_up.labels(camera=self.camera_id).set(1 if new == StreamState.STREAMING else 0)
        self._cond.notify_all()  # read() returns None promptly once a terminal state is reached
        return True

    def _transition(self, new: StreamState) -> None:
        with self._cond:
            self._set_state(new)

    def _count_drop(self, reason: str) -> None:
        """Caller holds ``self._cond``."""
        self._frames_dropped += 1
        self._metrics.frames_dropped.labels(camera=self.camera_id, reason=reason).inc()

    def _record_error(self, kind: str, message: str) -> None:
        """Count a ``decode_errors{kind}`` and log it, rate-limited per kind (``pipeline.log_limits``)."""
        self._metrics.decode_errors.labels(camera=self.camera_id, kind=kind).inc()
        with self._cond:
            self._last_error = f"{kind}: {message}"
        self._error_log.warning(kind, "camera %s: %s", self.camera_id, message)

    # ------------------------------------------------------------------------------ decode thread

    def _run(self) -> None:
        try:
            self._run_connections()
        except Exception:
            # A bug must not kill the thread silently and leave read() waiting forever.
            log.exception("camera %s: decode thread crashed", self.camera_id)
            with self._cond:
                self._last_error = "internal error (see log)"
                self._set_state(StreamState.FAILED)
        finally:
            with self._cond:
                if self._state not in TERMINAL_STATES:
                    self._set_state(StreamState.STOPPED)
                self._cond.notify_all()

    def _run_connections(self) -> None:
        """Open, decode, and on failure back off and reopen, until ended, failed or stopped."""
        while not self._stop_event.is_set():
            with self._cond:
                if self._state == StreamState.RECONNECTING:
                    self._set_state(StreamState.CONNECTING)
            try:
                container = self._open()
            except (av.error.FFmpegError, OSError, ValueError) as error:
                # ExitError here means PyAV's interrupt callback cut the open short.
                reason = f"no answer within {self.config.open_timeout_s:g}s" if isinstance(error, av.error.ExitError) else _describe(error)
                self._record_error("open", f"cannot open {self._display_url}: {reason}")
                if not self._schedule_reconnect():
                    return
                continue

            try:
                outcome = self._decode(container)
            finally:
                try:
                    container.close()
                except Exception as error:  # closing must never mask what happened while decoding
                    log.debug("camera %s: error closing container: %s", self.camera_id, error)

            if outcome == _Outcome.STOPPED or self._stop_event.is_set():
                return
            if outcome == _Outcome.EOF and self._is_file:
                if self.config.loop and self._segment_frames > 0:
                    # Reopening is cheap for a local file and, unlike seek(0), works for raw
                    # H.264 and MPEG-TS too; the timeline keeps PTS increasing across loops.
                    log.debug("camera %s: end of file, looping", self.camera_id)
                    continue
                if self.config.loop:
                    log.error("camera %s: %s has no decodable frames; not looping over it", self.camera_id, self._display_url)
                self._transition(StreamState.ENDED)
                return
            if outcome == _Outcome.EOF:
                log.warning("camera %s: stream ended by the server", self.camera_id)
            if not self._schedule_reconnect():
                return

    def _open(self) -> Any:
        target = local_path(self.config.url) if self._is_file else self.config.url
        options = self._ffmpeg_options()
        # (open, read) timeouts: the read timeout is the watchdog for a stream that goes silent.
        return self._opener(
            target,
            mode="r",
            options=options,
            timeout=(self.config.open_timeout_s, self.config.watchdog_timeout_s),
        )

    def _ffmpeg_options(self) -> dict[str, str]:
        scheme = url_scheme(self.config.url)
        socket_timeout_us = str(int(self.config.watchdog_timeout_s * 1_000_000))
        # Only this scheme's protocols, for the open and every nested one (pipeline/url_policy.py).
        options = {"protocol_whitelist": protocol_whitelist(self.config.url)}
        if scheme in ("rtsp", "rtsps"):
            # "timeout" is the RTSP socket I/O timeout in FFmpeg >= 5 (it replaced "stimeout").
            options.update(rtsp_transport=self.config.transport, timeout=socket_timeout_us)
        elif scheme in ("http", "https"):
            # Generic AVIO read/write timeout; also applies to HLS playlist and segment fetches.
            options.update(rw_timeout=socket_timeout_us)
        return options

    def _schedule_reconnect(self) -> bool:
        """Wait out the backoff before the next attempt; False when giving up or stopping.

        Files do not retry by default (``max_reconnects`` None counts as 0): a missing or
        unreadable file does not fix itself by waiting, and failing fast makes a typo in a
        path obvious. An explicit ``max_reconnects`` is honoured for files too (e.g. a file
        that a recorder is about to write). For live streams None means retry forever.
        """
        limit = self.config.max_reconnects
        if limit is None and self._is_file:
            limit = 0
        with self._cond:
            if limit is not None and self._failures_in_a_row >= limit:
                log.error(
                    "camera %s: giving up on %s after %d reconnect attempt(s): %s",
                    self.camera_id,
                    self._display_url,
                    self._failures_in_a_row,
                    self._last_error,
                )
                self._set_state(StreamState.FAILED)
                return False
            self._failures_in_a_row += 1
            self._reconnects += 1
            attempt = self._failures_in_a_row
            if not self._set_state(StreamState.RECONNECTING):
                return False
        self._metrics.reconnects.labels(camera=self.camera_id).inc()
        delay = self._backoff.next_delay()
        log.info("camera %s: reconnect attempt %d in %.2fs", self.camera_id, attempt, delay)
        # Event.wait returns early on stop(), so a long backoff never delays shutdown.
        return not self._stop_event.wait(delay)

    def _decode(self, container: Any) -> _Outcome:
        """Demux and decode one open container until EOF, a stall, an error or stop()."""
        if not container.streams.video:
            self._record_error("open", f"cannot open {self._display_url}: no video stream")
            return _Outcome.ERROR
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        interval_s = float(1 / rate) if rate else None
        self._timeline.new_segment(use_wall_gap=not self._is_file)
        self._segment_frames = 0
        self._last_progress = time.monotonic()
        packets: Iterator[Any] = container.demux(stream)
        demux_errors_in_a_row = 0

        while not self._stop_event.is_set():
            try:
                packet = next(packets)
            except StopIteration:
                return _Outcome.EOF
            except (av.error.ExitError, av.error.TimeoutError) as error:
                # ExitError: PyAV's interrupt callback fired (read timeout = watchdog);
                # TimeoutError: the protocol's own rw_timeout / timeout option.
                self._record_error(
                    "stall", f"no data from {self._display_url} for {self.config.watchdog_timeout_s:g}s ({_describe(error)})"
                )
                return _Outcome.STALL
            except (av.error.FFmpegError, OSError) as error:
                self._record_error("decode", f"demux error on {self._display_url}: {_describe(error)}")
                if not self._is_file:
                    return _Outcome.ERROR
                # A damaged file: a new demux generator resumes reading where FFmpeg resyncs
                # (reopening would start over and repeat frames).
                demux_errors_in_a_row += 1
                if demux_errors_in_a_row >= MAX_CONSECUTIVE_DEMUX_ERRORS:
                    log.error("camera %s: giving up on the rest of %s after repeated demux errors", self.camera_id, self._display_url)
                    return _Outcome.EOF
                packets = container.demux(stream)
                continue
            demux_errors_in_a_row = 0

            decode_started = time.perf_counter()
            try:
                frames = packet.decode()
            except av.error.FFmpegError as error:
                # Corrupt H.264 (lost packets, damaged bytes): skip the packet, the decoder
                # recovers at the next keyframe at the latest.
                self._record_error("decode", f"decode error on {self._display_url}: {_describe(error)}")
                frames = []

            for av_frame in frames:
                if self._stop_event.is_set():
                    return _Outcome.STOPPED
                self._handle_frame(av_frame, interval_s, decode_started)
                decode_started = time.perf_counter()
                self._last_progress = time.monotonic()

            if not frames and time.monotonic() - self._last_progress > self.config.watchdog_timeout_s:
                # Packets keep coming but none decodes into a frame (garbage, audio-only): the
                # read timeout cannot see that, so this is the second half of the watchdog.
                self._record_error("stall", f"no decodable frame from {self._display_url} for {self.config.watchdog_timeout_s:g}s")
                return _Outcome.STALL
        return _Outcome.STOPPED

    def _handle_frame(self, av_frame: Any, interval_s: float | None, decode_started: float) -> None:
        wall = time.monotonic()
        raw_pts = float(av_frame.time) if av_frame.time is not None else None
        pts_s = self._timeline.next(raw_pts, interval_s, wall)
        decoded_at = self._clock()
        self._segment_frames += 1
        self._metrics.frames_decoded.labels(camera=self.camera_id).inc()
        with self._cond:
            index = self._next_index
            self._next_index += 1
            self._frames_decoded += 1
            self._last_frame_time = decoded_at
            self._decoded_rate.add(wall)
            if self._state != StreamState.STREAMING and self._set_state(StreamState.STREAMING):
                # Frames flow again: the next failure starts from the shortest delay.
                self._failures_in_a_row = 0
                self._backoff.reset()

        if not self._limiter.admit(pts_s):
            with self._cond:
                self._count_drop("fps_limit")
            return

        pixels = av_frame.width * av_frame.height
        if pixels > self.config.max_frame_pixels:
            # Refused before the BGR copy: an 8K frame is ~100 MB, and a hostile stream can claim any size.
            limit = self.config.max_frame_pixels
            self._record_error("decode", f"{av_frame.width}x{av_frame.height} frame above max_frame_pixels ({limit})")
            with self._cond:
                self._count_drop("too_large")
            return

        # Colour conversion is the expensive part, so only admitted frames pay for it.
        image = av_frame.to_ndarray(format="bgr24")
        self._metrics.stage_latency.labels(stage="decode").observe(time.perf_counter() - decode_started)
        capture_time = decoded_at
        if self._paced:
            self._pace(pts_s)
            # A paced file stands in for a camera, which stamps a frame when it is released;
            # stamping at decode time would count the pacing wait as pipeline latency.
            capture_time = self._clock()
        self._publish(VideoFrame(self.camera_id, index, pts_s, capture_time, image))

    def _pace(self, pts_s: float) -> None:
        """Sleep until ``pts_s`` is due on the wall clock, like a live camera would deliver it."""
        now = time.monotonic()
        if self._pace_anchor is None:
            self._pace_anchor = (now, pts_s)
            return
        anchor_wall, anchor_pts = self._pace_anchor
        delay = anchor_wall + (pts_s - anchor_pts) - now
        if delay > MAX_PACING_GAP_S or delay < -MAX_PACING_GAP_S:
            # A PTS jump, or decoding fell behind: re-anchor rather than stall or burst.
            self._pace_anchor = (now, pts_s)
            return
        if delay > 0:
            self._stop_event.wait(delay)

    def _publish(self, frame: VideoFrame) -> None:
        with self._cond:
            if self._lossless:
                # Offline mode: wait for the consumer instead of dropping.
                while self._slot is not None and not self._stop_event.is_set():
                    self._cond.wait(0.25)
            if self._stop_event.is_set():
                self._count_drop("stale")  # decoded but never handed out
                return
            if self._slot is not None:
                self._count_drop("stale")
            self._slot = frame
            self._cond.notify_all()
