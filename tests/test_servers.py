"""The real-server fixtures work: a looping RTSP camera for PyAV clients, and a scraping Prometheus."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import av
import pytest
from prometheus_client import CollectorRegistry, Counter, start_http_server

from tests.conftest import free_port, require
from tests.servers import (
    DEFAULT_CLIP,
    PrometheusFactory,
    PrometheusServer,
    RtspServer,
    RtspServerFactory,
    rtsp_server_support,
    sample_value,
)

pytestmark = pytest.mark.integration

CLIP_SIZE = (480, 270)
FRAME_TICKS = 7200  # one frame at 12.5 fps in RTP's 90 kHz clock
SHORT_CLIP = "face-demographics-walking-and-pause"  # 41 frames: the quickest to loop


@dataclass
class Reading:
    pts: list[int]  # decoded frames' timestamps (90 kHz), None ones dropped
    arrivals: list[float]  # monotonic seconds at which each frame was decoded
    sizes: set[tuple[int, int]]


def read_frames(url: str, transport: str, count: int, timeout_s: float = 10.0) -> Reading:
    """Decode ``count`` frames from an RTSP URL with PyAV, as the pipeline's source does."""
    reading = Reading([], [], set())
    with av.open(url, options={"rtsp_transport": transport}, timeout=timeout_s) as container:
        for frame in container.decode(video=0):
            reading.arrivals.append(time.monotonic())
            # FFmpeg's RTSP demuxer leaves the very first packet unstamped (it has not seen the
            # RTP clock's origin yet); every later frame carries a pts.
            if frame.pts is not None:
                reading.pts.append(frame.pts)
            reading.sizes.add((frame.width, frame.height))
            if len(reading.arrivals) >= count:
                break
    return reading


def assert_even_timestamps(reading: Reading) -> None:
    steps = {later - earlier for earlier, later in pairwise(reading.pts)}
    assert steps == {FRAME_TICKS}, f"frame timestamps not evenly spaced at 12.5 fps: steps {sorted(steps)}"


@pytest.fixture
def rtsp_available() -> None:
    available, reason = rtsp_server_support()
    require(available, reason)


@pytest.mark.shared
def test_rtsp_serves_tcp_and_udp_clients_at_once(rtsp_server: RtspServer) -> None:
    # Three clients at the same time, both transports: each gets its own stream from frame 0.
    transports = ["tcp", "udp", "tcp"]
    with ThreadPoolExecutor(len(transports)) as pool:
        readings = list(pool.map(lambda transport: read_frames(rtsp_server.url, transport, 20), transports))
    for transport, reading in zip(transports, readings, strict=True):
        assert len(reading.arrivals) >= 20, transport
        assert reading.sizes == {CLIP_SIZE}, transport
        assert_even_timestamps(reading)


@pytest.mark.shared
def test_rtsp_loops_the_clip_forever_at_real_time(rtsp_server_factory: RtspServerFactory, shared_clips: dict[str, Path]) -> None:
    server = rtsp_server_factory(shared_clips[SHORT_CLIP])
    reading = read_frames(server.url, "tcp", 56)
    # 56 frames out of a 41-frame clip: the loop went on, with no gap or jump in the timestamps.
    assert len(reading.arrivals) == 56
    assert_even_timestamps(reading)
    # The client's stream probing buffers the first ~2 s, then frames arrive live: 20 frames
    # at 12.5 fps take 1.6 s.
    live = reading.arrivals[55] - reading.arrivals[35]
    assert 1.0 < live < 3.0, f"20 frames took {live:.2f}s, not about real time"


@pytest.mark.shared
def test_rtsp_server_restarts_on_the_same_port(rtsp_server: RtspServer) -> None:
    container = av.open(rtsp_server.url, options={"rtsp_transport": "tcp"}, timeout=5.0)
    frames = container.decode(video=0)
    for _ in range(5):
        next(frames)

    rtsp_server.stop()
    assert not rtsp_server.running
    # The connected client runs dry: its stream ends or errors once the buffered frames are used.
    deadline = time.monotonic() + 10
    with pytest.raises((StopIteration, av.FFmpegError, OSError)):
        while time.monotonic() < deadline:
            next(frames)
    container.close()
    # A new connection is refused while the server is down.
    with pytest.raises((av.FFmpegError, OSError)):
        av.open(rtsp_server.url, options={"rtsp_transport": "tcp"}, timeout=5.0)

    rtsp_server.start()
    reading = read_frames(rtsp_server.url, "tcp", 20)
    assert len(reading.arrivals) == 20
    assert reading.sizes == {CLIP_SIZE}


@pytest.mark.shared
def test_rtsp_shared_mode_serves_concurrent_clients(rtsp_server_factory: RtspServerFactory, shared_clips: dict[str, Path]) -> None:
    server = rtsp_server_factory(shared_clips[DEFAULT_CLIP], mount="/live", shared=True)
    assert server.url.endswith("/live")
    with ThreadPoolExecutor(2) as pool:
        readings = list(pool.map(lambda transport: read_frames(server.url, transport, 20), ["udp", "tcp"]))
    for reading in readings:
        assert len(reading.arrivals) == 20
        assert_even_timestamps(reading)


def port_is_closed(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.shared
def test_rtsp_server_is_stopped_even_when_the_test_fails(rtsp_available: None, shared_clips: dict[str, Path], tmp_path: Path) -> None:
    port = free_port()
    server = RtspServer(shared_clips[SHORT_CLIP], port, tmp_path / "rtsp.log")
    with pytest.raises(ZeroDivisionError), server:
        server.start()
        pid = server.pid
        assert server.running and not port_is_closed(port)
        _ = 1 / 0  # the "test" fails while the server runs
    assert not server.running and port_is_closed(port)
    assert pid is not None and not Path(f"/proc/{pid}").exists()


def test_rtsp_server_reports_a_bad_clip(rtsp_available: None, tmp_path: Path) -> None:
    server = RtspServer(tmp_path / "missing.mp4", free_port(), tmp_path / "rtsp.log")
    with pytest.raises(RuntimeError, match="exited with status"):
        server.start()
    assert not server.running


@pytest.fixture
def exporter() -> Iterator[tuple[int, Counter]]:
    """A prometheus_client metrics endpoint on a free port with one counter, shut down afterwards."""
    registry = CollectorRegistry()
    counter = Counter("ferstream_fixture_checks", "A counter that the Prometheus fixture test reads back", registry=registry)
    port = free_port()
    http_server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    yield port, counter
    http_server.shutdown()
    http_server.server_close()
    thread.join(timeout=5)


def test_prometheus_scrapes_initial_and_added_targets(prometheus_factory: PrometheusFactory, exporter: tuple[int, Counter]) -> None:
    port, counter = exporter
    counter.inc(3)
    prometheus: PrometheusServer = prometheus_factory([f"127.0.0.1:{port}"])

    results = prometheus.wait_for("ferstream_fixture_checks_total", lambda found: bool(found) and sample_value(found[0]) == 3)
    assert results[0]["metric"]["instance"] == f"127.0.0.1:{port}"
    assert results[0]["metric"]["job"] == prometheus.job

    # A target added after start (the way a test adds the app's metrics port), with a label.
    second = CollectorRegistry()
    Counter("ferstream_fixture_added", "A counter on a target added at run time", registry=second).inc(7)
    second_port = free_port()
    second_server, second_thread = start_http_server(second_port, addr="127.0.0.1", registry=second)
    try:
        prometheus.add_targets([f"127.0.0.1:{second_port}"], labels={"role": "added"})
        results = prometheus.wait_for('ferstream_fixture_added_total{role="added"}', lambda found: bool(found))
        assert sample_value(results[0]) == 7
        prometheus.wait_for_target(f"127.0.0.1:{second_port}")
        assert prometheus.target_health() == {f"127.0.0.1:{port}": "up", f"127.0.0.1:{second_port}": "up"}
    finally:
        second_server.shutdown()
        second_server.server_close()
        second_thread.join(timeout=5)

    # Later increments show up within a few scrape intervals.
    counter.inc(2)
    prometheus.wait_for("ferstream_fixture_checks_total", lambda found: bool(found) and sample_value(found[0]) == 5, timeout_s=10)

    prometheus.stop()
    assert not prometheus.running and port_is_closed(prometheus.port)


def test_prometheus_query_errors_are_explained(prometheus_server: PrometheusServer) -> None:
    assert prometheus_server.query("1 + 1") == [{"metric": {}, "value": [pytest.approx(time.time(), abs=60), "2"]}]
    with pytest.raises(RuntimeError, match="400"):
        prometheus_server.query("sum(")
