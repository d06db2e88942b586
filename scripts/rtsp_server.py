#!/usr/bin/python3
"""A looping RTSP test camera: serves one H.264 MP4 clip forever on rtsp://HOST:PORT/MOUNT.

Run it with Debian's system python3 (python3-gi, gir1.2-gst-rtsp-server-1.0,
gstreamer1.0-plugins-good and -bad): the project's venv cannot import ``gi``.

Why appsrc instead of a plain launch line: ``filesrc ! qtdemux ! ...`` ends with EOS after
one pass (clients see the stream end), and ``multifilesrc loop=true ! qtdemux`` does too:
qtdemux stops once it has the first copy's samples and ignores the repeated bytes. A
segment-seek loop would need a custom GstRTSPMedia that re-seeks on SEGMENT_DONE and also
survives the server's own seek for each client's ``Range: npt=0-``. So the clip is demuxed ONCE into
memory (no decoding or re-encoding: the H.264 access units are sent as they are in the file)
and pushed into ``appsrc`` in a loop, each pass shifted by the clip's duration, so RTP
timestamps keep increasing at the clip's frame rate across loops and the sinks pace the
stream at real time.

Two modes:
* default: every client gets its own pipeline that starts at the clip's first (key) frame, so
  a client decodes its first frame at once (fast, deterministic tests);
* ``--shared``: one live pipeline for all clients, like a real camera: a late client joins
  mid-stream and waits for the next keyframe.

The process prints ``READY rtsp://...`` on stdout once it accepts connections, and exits on
SIGTERM/SIGINT (tests/servers.py starts it under ``setpriv --pdeathsig``, so it also dies
with a crashed test runner).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from dataclasses import dataclass

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402  (gi needs require_version first)


@dataclass(frozen=True)
class AccessUnit:
    """One H.264 access unit from the file, with timestamps relative to the clip start (ns)."""

    data: bytes
    pts: int
    dts: int
    duration: int
    keyframe: bool


@dataclass(frozen=True)
class Clip:
    caps: Gst.Caps
    units: list[AccessUnit]
    period: int  # ns that one pass of the clip lasts; the timestamp shift between passes


def load_clip(path: str, timeout_s: float = 30.0) -> Clip:
    """Demux (not decode) every access unit of the clip's video track into memory."""
    if not os.path.isfile(path):
        raise RuntimeError(f"no such clip: {path}")
    pipeline = Gst.parse_launch("filesrc name=src ! qtdemux ! h264parse ! appsink name=sink sync=false")
    pipeline.get_by_name("src").set_property("location", path)
    sink = pipeline.get_by_name("sink")
    bus = pipeline.get_bus()
    pipeline.set_state(Gst.State.PLAYING)
    caps: Gst.Caps | None = None
    raw: list[tuple[bytes, int, int, int, bool]] = []
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            # try-pull with a timeout, not pull-sample: after an error (not an MP4, no H.264
            # track) the appsink gets neither data nor EOS, and pull-sample would wait forever.
            sample = sink.emit("try-pull-sample", Gst.SECOND // 10)
            if sample is None:
                message = bus.pop_filtered(Gst.MessageType.ERROR)
                if message is not None:
                    error, debug = message.parse_error()
                    raise RuntimeError(f"cannot demux {path}: {error.message} ({debug})")
                if sink.get_property("eos"):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"demuxing {path} took more than {timeout_s}s")
                continue
            if caps is None:
                caps = sample.get_caps()
            buffer = sample.get_buffer()
            ok, info = buffer.map(Gst.MapFlags.READ)
            if not ok:
                raise RuntimeError(f"cannot map a buffer of {path}")
            try:
                data = bytes(info.data)
            finally:
                buffer.unmap(info)
            dts = buffer.dts if buffer.dts != Gst.CLOCK_TIME_NONE else buffer.pts
            raw.append((data, buffer.pts, dts, buffer.duration, not buffer.has_flags(Gst.BufferFlags.DELTA_UNIT)))
    finally:
        pipeline.set_state(Gst.State.NULL)
    if caps is None or not raw:
        raise RuntimeError(f"no H.264 video found in {path}")
    if not raw[0][4]:
        raise RuntimeError(f"{path} does not start with a keyframe")
    # qtdemux shifts PTS by the edit list (B-frame delay); DTS starts at 0. Keep both relative to
    # the first DTS so PTS >= DTS holds, which the payloader and the client's decoder expect.
    origin = min(dts for _, _, dts, _, _ in raw)
    fallback = raw[1][2] - raw[0][2] if len(raw) > 1 else 40_000_000
    units = [
        AccessUnit(data, pts - origin, dts - origin, duration if duration != Gst.CLOCK_TIME_NONE else fallback, key)
        for data, pts, dts, duration, key in raw
    ]
    # The next pass starts one frame after the last frame's DTS, so decode order stays evenly spaced.
    period = units[-1].dts + units[-1].duration
    return Clip(caps, units, period)


class LoopFeeder:
    """Feeds one media's appsrc with the clip, pass after pass, timestamps shifted per pass."""

    def __init__(self, clip: Clip, appsrc: Gst.Element, live: bool) -> None:
        self._clip = clip
        self._appsrc = appsrc
        self._live = live
        self._index = 0  # access units pushed so far, over all passes
        self._base: int | None = None
        appsrc.connect("need-data", self._on_need_data)

    def _start_time(self) -> int:
        if not self._live:
            return 0  # a non-live pipeline's running time starts at 0 with its first buffer
        # A live source must stamp buffers in the pipeline's running time (now), or the sinks
        # would drop them as late or wait. One frame of headroom covers the push itself.
        clock = self._appsrc.get_clock()
        now = clock.get_time() - self._appsrc.get_base_time() if clock is not None else 0
        return max(now, 0) + self._clip.units[0].duration

    def _on_need_data(self, appsrc: Gst.Element, _length: int) -> None:
        if self._base is None:
            self._base = self._start_time()
        units = self._clip.units
        # Push a few units per call: fewer Python round trips, and appsrc's own queue limit
        # still stops us running ahead of real time (the sinks pace playback on the clock).
        for _ in range(4):
            passes, position = divmod(self._index, len(units))
            unit = units[position]
            shift = self._base + passes * self._clip.period
            buffer = Gst.Buffer.new_wrapped(unit.data)
            buffer.pts = unit.pts + shift
            buffer.dts = unit.dts + shift
            buffer.duration = unit.duration
            if not unit.keyframe:
                buffer.set_flags(Gst.BufferFlags.DELTA_UNIT)
            result = appsrc.emit("push-buffer", buffer)
            if result != Gst.FlowReturn.OK:
                return  # flushing or shutting down: the media is going away
            self._index += 1


class LoopingFactory(GstRtspServer.RTSPMediaFactory):
    def __init__(self, clip: Clip, shared: bool) -> None:
        super().__init__()
        self._clip = clip
        self._live = shared
        # SPS/PPS go in-band before every IDR access unit, so a client that joins late (shared
        # mode) can start decoding at the next keyframe even if it ignores the SDP. h264parse
        # inserts them per access unit; rtph264pay's own config-interval=-1 inserts them before
        # every IDR *slice*, which splits a multi-slice IDR (x264 sliced threads, as in the
        # shared clips) into two pictures in FFmpeg's parser: one duplicate frame per keyframe.
        self.set_launch(
            f"( appsrc name=src format=time stream-type=stream is-live={str(shared).lower()} "
            "! h264parse config-interval=-1 ! rtph264pay name=pay0 pt=96 config-interval=0 )"
        )
        self.set_shared(shared)
        self.connect("media-configure", self._on_media_configure)

    def _on_media_configure(self, _factory: GstRtspServer.RTSPMediaFactory, media: GstRtspServer.RTSPMedia) -> None:
        appsrc = media.get_element().get_by_name_recurse_up("src")
        appsrc.set_property("caps", self._clip.caps)
        # The need-data handler's closure keeps the feeder alive exactly as long as the appsrc.
        LoopFeeder(self._clip, appsrc, live=self._live)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("clip", help="an MP4 file with an H.264 video track (audio is ignored)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mount", default="/cam", help="the URL path, e.g. /cam")
    parser.add_argument("--shared", action="store_true", help="one live stream for all clients, like a camera")
    args = parser.parse_args(argv)

    Gst.init(None)
    try:
        clip = load_clip(args.clip)
    except RuntimeError as error:
        print(f"rtsp_server: {error}", file=sys.stderr)
        return 1

    server = GstRtspServer.RTSPServer()
    server.set_address(args.host)
    server.set_service(str(args.port))
    server.get_mount_points().add_factory(args.mount, LoopingFactory(clip, args.shared))
    loop = GLib.MainLoop()
    if server.attach(None) == 0:
        print(f"cannot listen on {args.host}:{args.port}", file=sys.stderr)
        return 1

    def quit_loop() -> bool:
        loop.quit()
        return GLib.SOURCE_REMOVE

    GLib.unix_signal_add(GLib.PRIORITY_HIGH, signal.SIGTERM, quit_loop)
    GLib.unix_signal_add(GLib.PRIORITY_HIGH, signal.SIGINT, quit_loop)
    print(f"READY rtsp://{args.host}:{args.port}{args.mount} ({len(clip.units)} frames, {clip.period / 1e9:.2f}s per pass)", flush=True)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
