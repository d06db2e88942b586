"""CameraSource with the PyAV reader against real decoding: synthetic clips, damaged files and misbehaving servers.

The camera's own logic with a reader that needs no video library is in test_camera.py."""

from __future__ import annotations

import http.server
import logging
import random
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import SourceConfig
from pipeline.frames import StreamState, VideoFrame
from pipeline.metrics import PipelineMetrics
from pipeline.sources.camera import CameraSource
from pipeline.sources.pyav_reader import PyAVFrameReader
from pipeline.url_policy import local_path
from tests.conftest import free_port
from tests.media import encode_test_clip, read_marker
from tests.pipeline.sources.helpers import assert_accounted, drain, make_config, sample, source_threads, wait_until


@pytest.fixture
def start(metrics: PipelineMetrics, sources: list[CameraSource]) -> Any:
    def _start(config: SourceConfig, metrics_: PipelineMetrics | None = None) -> CameraSource:
        source = CameraSource(config, metrics_ or metrics, reader=PyAVFrameReader(), rng=random.Random(7))
        sources.append(source)
        source.start()
        return source

    return _start


# ----------------------------------------------------------------------------------------- files


def test_frames_carry_camera_index_pts_capture_time_and_bgr_image(tmp_path, metrics, start):
    clip = encode_test_clip(tmp_path / "clip.mp4", frames=20, fps=25)
    before = time.time()
    source = start(make_config(clip))
    frames = drain(source)
    after = time.time()

    assert [read_marker(f.image) for f in frames] == list(range(20))
    assert [f.frame_index for f in frames] == list(range(20))
    assert all(f.camera_id == "cam" for f in frames)
    assert [f.pts_s for f in frames] == pytest.approx([i / 25 for i in range(20)])
    assert all(before <= f.capture_time <= after for f in frames)
    assert all(a.capture_time <= b.capture_time for a, b in pairwise(frames))
    image = frames[0].image
    assert image.shape == (96, 160, 3) and image.dtype.name == "uint8"
    # The clip's blue channel is a constant 96; in BGR order that is channel 0.
    assert abs(float(image[40:, :, 0].mean()) - 96) < 6

    status = source.status()
    assert status.state == StreamState.ENDED and source.finished
    assert status.frames_decoded == 20 and status.frames_dropped == 0 and status.reconnects == 0
    assert status.last_frame_time is not None and status.last_error is None
    assert sample(metrics, "frames_decoded_total") == 20
    assert sample(metrics, "frames_processed_total") == 20
    assert sample(metrics, "stream_up") == 0
    assert source.read(timeout=0.01) is None


def test_bframes_clip_comes_out_in_presentation_order(tmp_path, start):
    clip = encode_test_clip(tmp_path / "bframes.mp4", frames=30, fps=25, bframes=2)
    frames = drain(start(make_config(clip)))
    assert [read_marker(f.image) for f in frames] == list(range(30))
    assert [f.pts_s for f in frames] == pytest.approx([i / 25 for i in range(30)])


def test_raw_h264_without_pts_gets_synthesized_increasing_pts(tmp_path, start):
    clip = encode_test_clip(tmp_path / "raw.h264", frames=15, fps=25)
    frames = drain(start(make_config(clip)))
    assert [read_marker(f.image) for f in frames] == list(range(15))
    steps = [b.pts_s - a.pts_s for a, b in pairwise(frames)]
    assert steps == pytest.approx([1 / 25] * 14)


def test_file_url_with_escaped_characters(tmp_path, start):
    clip = encode_test_clip(tmp_path / "my clip.ts", frames=5)
    url = "file://" + urllib.parse.quote(str(clip))
    assert local_path(url) == str(clip)
    assert len(drain(start(make_config(url)))) == 5


def test_target_fps_passes_frames_by_pts_and_counts_the_rest(tmp_path, metrics, start):
    clip = encode_test_clip(tmp_path / "clip.mp4", frames=50, fps=25)
    source = start(make_config(clip, target_fps=5))
    frames = drain(source)
    assert [read_marker(f.image) for f in frames] == list(range(0, 50, 5))
    assert [f.frame_index for f in frames] == list(range(0, 50, 5))  # indices count the dropped frames too
    assert sample(metrics, "frames_dropped_total", reason="fps_limit") == 40
    assert sample(metrics, "frames_processed_total") == 10
    assert_accounted(source, metrics)


def test_slow_consumer_gets_the_freshest_frame_and_stale_ones_are_counted(tmp_path, metrics, start):
    clip = encode_test_clip(tmp_path / "clip.mp4", frames=60, fps=50)  # 1.2 s, paced like a camera
    source = start(make_config(clip, realtime=True))
    frames: list[VideoFrame] = []
    latencies: list[float] = []
    while not source.finished:
        frame = source.read(timeout=1.0)
        if frame is not None:
            latencies.append(time.time() - frame.capture_time)
            frames.append(frame)
            time.sleep(0.15)  # a consumer ~7x slower than the camera
    markers = [read_marker(f.image) for f in frames]
    assert markers == sorted(set(markers)) and len(frames) < 20
    assert sample(metrics, "frames_dropped_total", reason="stale") >= 30
    status = source.status()
    assert 3.0 < status.measured_fps < 12.0  # ~1 / 0.15 s
    assert status.decoded_fps > 20.0  # ~50, the clip's rate
    # The one-slot buffer holds a frame for at most one camera interval (20 ms) before a fresher one
    # replaces it, so latency stays flat instead of growing by 0.13 s per read (slack for loaded CI).
    assert max(latencies) < 0.25 and latencies[-1] < 0.25
    assert_accounted(source, metrics)


def test_realtime_false_waits_for_the_consumer_and_drops_nothing(tmp_path, metrics, start):
    clip = encode_test_clip(tmp_path / "clip.mp4", frames=30, fps=25)
    source = start(make_config(clip, realtime=False))
    frames: list[VideoFrame] = []
    while not source.finished:
        frame = source.read(timeout=1.0)
        if frame is not None:
            frames.append(frame)
            time.sleep(0.01)
    assert [read_marker(f.image) for f in frames] == list(range(30))
    assert sample(metrics, "frames_dropped_total", reason="stale") == 0
    assert_accounted(source, metrics)


def test_realtime_file_is_paced_by_pts(tmp_path, start):
    clip = encode_test_clip(tmp_path / "clip.mp4", frames=20, fps=40)  # 0.5 s of video
    source = start(make_config(clip, realtime=True))
    began = time.monotonic()
    frames = drain(source)
    elapsed = time.monotonic() - began
    assert 0.4 < elapsed < 2.0
    assert len(frames) >= 15  # a fast reader keeps up with 40 fps


def test_loop_keeps_going_past_the_end_with_increasing_pts(tmp_path, metrics, start):
    clip = encode_test_clip(tmp_path / "clip.ts", frames=10, fps=25)
    source = start(make_config(clip, loop=True))
    frames: list[VideoFrame] = []
    while len(frames) < 35:
        frame = source.read(timeout=2.0)
        assert frame is not None, source.status()
        frames.append(frame)
    assert [read_marker(f.image) for f in frames] == [i % 10 for i in range(35)]
    assert [f.frame_index for f in frames] == list(range(35))
    assert [f.pts_s for f in frames] == pytest.approx([i / 25 for i in range(35)])
    assert source.status().state == StreamState.STREAMING and sample(metrics, "stream_up") == 1
    assert sample(metrics, "reconnects_total") == 0  # a loop is not a reconnect
    source.stop()
    assert source.finished and source.status().state == StreamState.STOPPED
    assert sample(metrics, "stream_up") == 0


@pytest.mark.parametrize("as_url", [False, True], ids=["path", "file-url"])
def test_missing_file_fails_fast_with_a_clear_error(tmp_path, metrics, start, caplog, as_url):
    missing = tmp_path / "nope.mp4"
    caplog.set_level(logging.WARNING, logger="ferstream.sources")
    source = start(make_config(missing.as_uri() if as_url else missing))
    wait_until(lambda: source.finished, timeout_s=5.0, what="FAILED")
    assert source.read(timeout=0.01) is None
    status = source.status()
    assert status.state == StreamState.FAILED and status.reconnects == 0
    assert "No such file" in (status.last_error or "")
    assert sample(metrics, "decode_errors_total", kind="open") == 1
    assert any("camera cam: cannot open" in r.getMessage() and "No such file" in r.getMessage() for r in caplog.records)


def test_missing_file_retries_when_max_reconnects_is_set(tmp_path, metrics, start):
    source = start(make_config(tmp_path / "later.mp4", max_reconnects=2))
    wait_until(lambda: source.finished, timeout_s=5.0, what="FAILED")
    assert source.status().state == StreamState.FAILED
    assert sample(metrics, "reconnects_total") == 2
    assert sample(metrics, "decode_errors_total", kind="open") == 3


@pytest.mark.parametrize("suffix", [".mp4", ".ts"])
def test_truncated_file_delivers_frames_up_to_the_cut(tmp_path, metrics, start, suffix):
    clip = encode_test_clip(tmp_path / f"clip{suffix}", frames=50, fps=25, gop=10)
    data = clip.read_bytes()
    clip.write_bytes(data[: int(len(data) * 0.6)])
    source = start(make_config(clip))
    frames = drain(source)
    markers = [read_marker(f.image) for f in frames]
    assert len(markers) >= 20 and markers == list(range(len(markers)))
    assert source.status().state == StreamState.ENDED
    if suffix == ".mp4":  # the MP4 index promises samples past the cut: the decoder sees a partial one
        assert sample(metrics, "decode_errors_total", kind="decode") >= 1
    assert_accounted(source, metrics)


def test_corrupted_bytes_in_the_middle_are_counted_and_decoding_continues(tmp_path, metrics, start):
    clip = encode_test_clip(tmp_path / "clip.mp4", frames=50, fps=25, gop=10)
    data = bytearray(clip.read_bytes())
    rng = random.Random(1)
    middle = len(data) // 2
    data[middle : middle + 3000] = bytes(rng.randrange(256) for _ in range(3000))
    clip.write_bytes(bytes(data))

    source = start(make_config(clip))
    frames = drain(source)
    markers = [read_marker(f.image) for f in frames]
    assert markers[:20] == list(range(20))  # everything before the damage
    assert markers[-1] == 49  # and decoding recovered after it
    assert sample(metrics, "decode_errors_total", kind="decode") >= 1
    assert source.status().state == StreamState.ENDED
    assert source.status().last_error is not None
    assert_accounted(source, metrics)


# ---------------------------------------------------------------------------------- live sources


class StallingServer:
    """A TCP server on a free loopback port. ``payload`` None: accept and send nothing; else
    answer any request with an HTTP 200 and ``payload``, then keep the connection open, silent."""

    def __init__(self, payload: bytes | None = None) -> None:
        self.payload = payload
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)  # close() does not wake a blocked accept(); polling does
        self._closed = threading.Event()
        self.port = int(self._listener.getsockname()[1])
        self._clients: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, name="test-stalling-server", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(2.0)
            self.connections += 1
            self._clients.append(client)
            if self.payload is not None:
                try:
                    client.recv(65536)
                    client.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: video/mp2t\r\n\r\n" + self.payload)
                except OSError:
                    pass

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=2)
        self._listener.close()
        for client in self._clients:
            client.close()


@pytest.fixture
def stalling_server() -> Iterator[Any]:
    servers: list[StallingServer] = []

    def _make(payload: bytes | None = None) -> StallingServer:
        server = StallingServer(payload)
        servers.append(server)
        return server

    yield _make
    for server in servers:
        server.close()


def test_ffmpeg_options_follow_protocol_and_transport(metrics):
    calls: list[tuple[str, dict[str, Any]]] = []

    def opener(target: str, **kwargs: Any) -> Any:
        calls.append((target, kwargs))
        raise OSError("refused by the fake opener")

    cases = [
        ("rtsp://cam.local/stream", {"transport": "udp"}),
        ("https://cdn.example/live.m3u8", {}),
        ("file:///videos/a.mp4", {}),
    ]
    for url, extra in cases:
        config = make_config(url, max_reconnects=0, open_timeout_s=3, watchdog_timeout_s=4, **extra)
        source = CameraSource(config, metrics, reader=PyAVFrameReader(opener=opener))
        source.start()
        wait_until(lambda source=source: source.finished, what="FAILED")
        source.stop()
    (rtsp_url, rtsp), (http_url, http), (file_target, file) = calls
    assert rtsp["options"] == {"protocol_whitelist": "rtsp,rtp,udp,tcp", "rtsp_transport": "udp", "timeout": "4000000"}
    assert rtsp["timeout"] == (3, 4)
    assert http["options"] == {"protocol_whitelist": "http,https,tcp,tls,crypto", "rw_timeout": "4000000"}
    assert file_target == "/videos/a.mp4" and file["options"] == {"protocol_whitelist": "file"}


def test_the_protocol_whitelist_lets_files_play_and_stops_other_protocols(tmp_path, metrics, start):
    clip = encode_test_clip(tmp_path / "clip.mp4", frames=10)
    assert len(drain(start(make_config(clip)))) == 10
    # A SourceConfig refuses "concat:" outright; built past validation, FFmpeg itself refuses it.
    smuggled = make_config(clip).model_copy(update={"url": f"concat:{clip}|{clip}"})
    source = start(smuggled)
    assert drain(source) == []
    status = source.status()
    assert status.state == StreamState.FAILED and "Invalid argument" in (status.last_error or "")
    assert sample(metrics, "frames_decoded_total") == 10  # the first source's frames only


def test_frames_above_max_frame_pixels_are_dropped_before_conversion(tmp_path, metrics, start):
    clip = encode_test_clip(tmp_path / "wide.mp4", frames=8, size=(320, 96))
    source = start(make_config(clip, max_frame_pixels=320 * 96 - 1))
    assert drain(source) == []
    assert sample(metrics, "frames_dropped_total", reason="too_large") == 8
    assert sample(metrics, "frames_decoded_total") == 8
    assert "above max_frame_pixels" in (source.status().last_error or "")
    assert len(drain(start(make_config(clip, camera_id="cam2", max_frame_pixels=320 * 96)))) == 8


def test_unreachable_host_reconnects_with_backoff_then_fails(metrics, start):
    url = f"rtsp://127.0.0.1:{free_port()}/x"
    source = start(make_config(url, max_reconnects=3))
    wait_until(lambda: source.finished, timeout_s=5.0, what="FAILED")
    status = source.status()
    assert status.state == StreamState.FAILED and status.reconnects == 3
    assert "Connection refused" in (status.last_error or "")
    assert sample(metrics, "reconnects_total") == 3
    assert sample(metrics, "decode_errors_total", kind="open") == 4
    assert sample(metrics, "stream_up") == 0


def test_live_source_retries_forever_until_stopped(metrics, start):
    source = start(make_config(f"rtsp://127.0.0.1:{free_port()}/x"))  # max_reconnects None
    wait_until(lambda: sample(metrics, "reconnects_total") >= 4, what="reconnects")
    assert not source.finished
    source.stop()
    assert source.finished and source.status().state == StreamState.STOPPED


@pytest.mark.parametrize("scheme", ["http", "rtsp"])
def test_silent_server_is_cut_off_by_the_open_timeout(metrics, start, stalling_server, scheme):
    server = stalling_server(None)
    url = f"{scheme}://127.0.0.1:{server.port}/live"
    source = start(make_config(url, open_timeout_s=0.4, watchdog_timeout_s=0.4, max_reconnects=1))
    began = time.monotonic()
    wait_until(lambda: source.finished, timeout_s=10.0, what="FAILED")
    assert time.monotonic() - began < 4.0
    assert source.status().state == StreamState.FAILED
    assert server.connections == 2
    assert sample(metrics, "decode_errors_total", kind="open") == 2
    assert sample(metrics, "reconnects_total") == 1


@pytest.fixture
def http_dir(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A directory served over HTTP on a free loopback port: (directory, base URL)."""
    root = tmp_path / "www"
    root.mkdir()

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name="test-http", daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_hls_playlist_over_http(http_dir, metrics, start):
    root, base_url = http_dir
    encode_test_clip(root / "index.m3u8", frames=40, fps=25, gop=10)
    # A live source treats the end of a (VOD) playlist as a disconnect; max_reconnects=0 stops there.
    source = start(make_config(f"{base_url}/index.m3u8", realtime=True, max_reconnects=0))
    frames = drain(source)
    markers = [read_marker(f.image) for f in frames]
    assert markers and markers == sorted(set(markers))
    assert sample(metrics, "frames_decoded_total") == 40
    assert source.status().state == StreamState.FAILED
    assert_accounted(source, metrics)


def test_watchdog_reconnects_a_stream_that_stalls(tmp_path, metrics, start, stalling_server, caplog):
    clip = encode_test_clip(tmp_path / "live.ts", frames=100, fps=25)
    data = clip.read_bytes()
    server = stalling_server(data[: int(len(data) * 0.6)])  # ~60 frames, then silence
    caplog.set_level(logging.INFO, logger="ferstream.sources")
    source = start(make_config(f"http://127.0.0.1:{server.port}/live.ts", watchdog_timeout_s=0.5))

    frames: list[VideoFrame] = []
    deadline = time.monotonic() + 15
    while server.connections < 2 or sample(metrics, "frames_decoded_total") < 80:
        assert time.monotonic() < deadline, source.status()
        frame = source.read(timeout=0.2)
        if frame is not None:
            frames.append(frame)
    frames += [f for f in [source.read(timeout=0.5)] if f is not None]

    assert sample(metrics, "decode_errors_total", kind="stall") >= 1
    assert sample(metrics, "reconnects_total") >= 1
    assert source.status().reconnects >= 1
    # Frames from both connections, one timeline: indices and PTS keep increasing.
    assert [f.frame_index for f in frames] == sorted({f.frame_index for f in frames})
    assert all(b.pts_s > a.pts_s for a, b in pairwise(frames))
    transitions = [r.getMessage() for r in caplog.records if "->" in r.getMessage()]
    assert "camera cam: streaming -> reconnecting" in transitions
    source.stop()
    assert not source_threads()


def test_stop_interrupts_waits_and_joins_the_thread(tmp_path, metrics, start):
    clip = encode_test_clip(tmp_path / "clip.mp4", frames=10, fps=25)
    source = start(make_config(clip, realtime=False))  # nobody reads: the thread blocks on the slot
    wait_until(lambda: sample(metrics, "frames_decoded_total") >= 1, what="first frame")
    began = time.monotonic()
    source.stop()
    assert time.monotonic() - began < 1.0
    assert not source_threads() and source.finished
    source.stop()  # idempotent
    assert source.status().state == StreamState.STOPPED
    with pytest.raises(RuntimeError):
        source.start()
    assert_accounted(source, metrics)


def test_stop_during_a_stalled_network_read_returns_within_the_timeout(metrics, start, stalling_server):
    server = stalling_server(None)
    source = start(make_config(f"http://127.0.0.1:{server.port}/live.ts", open_timeout_s=0.5))
    wait_until(lambda: server.connections >= 1, what="connection")
    began = time.monotonic()
    source.stop()
    assert time.monotonic() - began < 2.0
    assert source.finished and not source_threads()


def test_stop_before_start_is_allowed(metrics):
    source = CameraSource(make_config("/nowhere.mp4"), metrics, reader=PyAVFrameReader())
    source.stop()
    assert source.finished and source.read(timeout=0.01) is None


def test_a_bad_source_does_not_hold_back_a_good_one(tmp_path, start):
    clip = encode_test_clip(tmp_path / "good.mp4", frames=25, fps=25)
    good_metrics, bad_metrics = PipelineMetrics(), PipelineMetrics()
    bad = start(make_config(f"rtsp://127.0.0.1:{free_port()}/x"), bad_metrics)
    good = start(make_config(clip), good_metrics)
    frames = drain(good)
    assert [read_marker(f.image) for f in frames] == list(range(25))
    assert good.status().state == StreamState.ENDED
    assert sample(bad_metrics, "reconnects_total") >= 1 and not bad.finished
    bad.stop()


@pytest.mark.shared
def test_shared_clips_decode_completely(shared_clips, metrics, start):
    expected = {56, 41}
    counts = set()
    for index, path in enumerate(sorted(shared_clips.values())):
        source = start(make_config(path, camera_id=f"shared{index}"))
        frames = drain(source)
        counts.add(len(frames))
        assert all(f.image.shape == (270, 480, 3) for f in frames)
        assert [f.frame_index for f in frames] == list(range(len(frames)))
        steps = [b.pts_s - a.pts_s for a, b in pairwise(frames)]
        assert steps == pytest.approx([1 / 12.5] * len(steps))
        assert source.status().state == StreamState.ENDED
    assert counts == expected
