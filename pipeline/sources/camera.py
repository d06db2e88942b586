"""The generic camera: one decode thread per camera, whatever reads its frames.

A ``CameraSource`` opens its source through a ``FrameReader`` (``pipeline/sources/reader.py``; PyAV
today), takes every decoded frame on a daemon thread and hands the freshest one to ``read()``. The
consumer (face detection) is usually slower than the camera, so the hand-over is a one-slot buffer:
a new frame replaces an unread one instead of queueing behind it, and latency never builds up.

Failure handling is an explicit state machine (``StreamState``)::

    CONNECTING -> STREAMING -> (ENDED | RECONNECTING | STOPPED)
         |                          |
         +--> RECONNECTING ---------+--> CONNECTING ... -> FAILED after max_reconnects

The reader bounds its own waits (open and read timeouts); this module adds the watchdog for input
that keeps coming with no frame in it, the reconnect backoff, the fps limit, realtime pacing of
files and one strictly increasing timeline across reconnects and loops.
"""

from __future__ import annotations

import enum
import logging
import random
import threading
import time
from collections.abc import Callable

from pipeline.backoff import Backoff
from pipeline.config import SourceConfig
from pipeline.frames import SourceStatus, StreamState, VideoFrame
from pipeline.log_limits import RepeatLimitedLog
from pipeline.metrics import PipelineMetrics
from pipeline.sources.reader import DecodedFrame, FrameReader, OpenStream, ReadIssue, SourceOpenError, StreamBroken
from pipeline.sources.timing import FpsLimiter, RateMeter, Timeline
from pipeline.url_policy import redact_url

log = logging.getLogger("ferstream.sources")

# Realtime file pacing re-anchors instead of sleeping (or bursting) across a PTS gap this big.
MAX_PACING_GAP_S = 1.0


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


class _Outcome(enum.Enum):
    """Why the loop over one open stream returned."""

    EOF = "eof"
    BROKEN = "broken"  # a stall or an error: reconnect
    STOPPED = "stopped"


class CameraSource:
    """One camera: decodes on a daemon thread, serves the freshest frame to ``read()``.

    ``reader`` opens the source (``frame_reader_for(config.url)`` in ``pipeline/sources/readers.py``
    picks it by URL scheme), ``clock`` replaces ``time.time`` for frame timestamps, ``rng`` makes
    the reconnect jitter reproducible.
    """

    def __init__(
        self,
        config: SourceConfig,
        metrics: PipelineMetrics,
        *,
        reader: FrameReader,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.camera_id = config.camera_id
        self._metrics = metrics
        self._reader = reader
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
        self._decoded_rate = RateMeter()
        self._processed_rate = RateMeter()
        # A corrupt stream can raise an error per packet: each kind is logged once per interval, with a count.
        self._error_log = RepeatLimitedLog(log)

        # Decode-thread-only state: no lock needed.
        self._timeline = Timeline()
        self._limiter = FpsLimiter(config.target_fps)
        self._pace_anchor: tuple[float, float] | None = None  # (monotonic, pts_s)
        self._last_progress = time.monotonic()
        self._segment_frames = 0  # frames decoded since the stream was (re)opened

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
        stream; if it is blocked in network I/O it exits within the open/watchdog timeout."""
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
                stream = self._reader.open(self.config)
            except SourceOpenError as error:
                self._record_error("open", str(error))
                if not self._schedule_reconnect():
                    return
                continue

            try:
                outcome = self._decode(stream)
            finally:
                try:
                    stream.close()
                except Exception as error:  # closing must never mask what happened while decoding
                    log.debug("camera %s: error closing the stream: %s", self.camera_id, error)

            if outcome == _Outcome.STOPPED or self._stop_event.is_set():
                return
            if outcome == _Outcome.EOF and self._is_file:
                if self._segment_frames == 0:
                    # A video stream whose samples are missing or all damaged ends like a finished clip;
                    # counted as this camera's failure, it is not mistaken for a short clip (nor looped over).
                    self._record_error("decode", f"{self._display_url} ended without a decodable frame")
                    self._transition(StreamState.FAILED)
                    return
                if self.config.loop:
                    # Reopening is cheap for a local file and, unlike seek(0), works for raw
                    # H.264 and MPEG-TS too; the timeline keeps PTS increasing across loops.
                    log.debug("camera %s: end of file, looping", self.camera_id)
                    continue
                self._transition(StreamState.ENDED)
                return
            if outcome == _Outcome.EOF:
                log.warning("camera %s: stream ended by the server", self.camera_id)
            if not self._schedule_reconnect():
                return

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

    def _decode(self, stream: OpenStream) -> _Outcome:
        """Take one open stream's frames until its end, a stall, an error or stop()."""
        interval_s = stream.frame_interval_s
        self._timeline.new_segment(use_wall_gap=not self._is_file)
        self._segment_frames = 0
        self._last_progress = time.monotonic()
        items = stream.items()

        while not self._stop_event.is_set():
            try:
                item = next(items)
            except StopIteration:
                return _Outcome.EOF
            except StreamBroken as error:
                self._record_error(error.kind, str(error))
                return _Outcome.BROKEN
            if isinstance(item, ReadIssue):
                self._record_error(item.kind, item.message)
            elif item is None:
                if time.monotonic() - self._last_progress > self.config.watchdog_timeout_s:
                    # Input keeps coming but none decodes into a frame (garbage, audio-only): a reader's
                    # read timeout cannot see that, so this is the second half of the watchdog.
                    self._record_error("stall", f"no decodable frame from {self._display_url} for {self.config.watchdog_timeout_s:g}s")
                    return _Outcome.BROKEN
            else:
                self._handle_frame(item, interval_s)
                self._last_progress = time.monotonic()
        return _Outcome.STOPPED

    def _handle_frame(self, decoded: DecodedFrame, interval_s: float | None) -> None:
        wall = time.monotonic()
        pts_s = self._timeline.next(decoded.pts_s, interval_s, wall)
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

        pixels = decoded.width * decoded.height
        if pixels > self.config.max_frame_pixels:
            # Refused before the BGR copy: an 8K frame is ~100 MB, and a hostile stream can claim any size.
            limit = self.config.max_frame_pixels
            self._record_error("decode", f"{decoded.width}x{decoded.height} frame above max_frame_pixels ({limit})")
            with self._cond:
                self._count_drop("too_large")
            return

        # Colour conversion is the expensive part, so only admitted frames pay for it.
        image = decoded.to_bgr()
        self._metrics.stage_latency.labels(stage="decode").observe(time.perf_counter() - decoded.decode_started)
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
