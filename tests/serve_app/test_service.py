"""The Serve app end to end with real parts: a GStreamer RTSP server looping a shared clip, a
redis-server, a local Ray cluster, the app started with `serve run` as the README says, and a
Prometheus server scraping Ray's metrics port. The tests share one running service and run in
file order, each building on the cameras the previous ones added."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
import yaml

from pipeline.events import ExpressionEvent, stream_key, validate_event_dict
from tests import support
from tests.conftest import REPO_ROOT, RedisServer, free_port, require
from tests.servers import PrometheusServer, RtspServer, sample_value

pytestmark = pytest.mark.integration

CLIP = "head-pose-face-detection-female-and-male"  # two people
FAST_RECONNECT = {"reconnect": {"initial_s": 0.2, "max_s": 1.0}, "watchdog_timeout_s": 3.0, "open_timeout_s": 3.0}


@dataclass
class Service:
    api: str
    redis_url: str
    ray_address: str
    metrics_port: int
    rtsp: RtspServer
    log_path: Path

    def events(self, camera_id: str) -> list[ExpressionEvent]:
        client = redis.Redis.from_url(self.redis_url)
        return [ExpressionEvent.from_fields(fields) for _id, fields in client.xrange(stream_key("ferstream", camera_id))]

    def event_count(self, camera_id: str) -> int:
        return int(redis.Redis.from_url(self.redis_url).xlen(stream_key("ferstream", camera_id)))

    def streams(self) -> dict[str, dict[str, Any]]:
        response = requests.get(f"{self.api}/streams", timeout=10)
        response.raise_for_status()
        return {stream["id"]: stream for stream in response.json()}

    def ingest(self) -> dict[str, Any]:
        """Ingest.describe() through a Serve handle, from a separate Ray driver process."""
        code = (
            "import json, ray; from ray import serve; "
            f"ray.init(address={self.ray_address!r}, logging_level='ERROR', log_to_driver=False); "
            "print(json.dumps(serve.get_deployment_handle('Ingest', 'ferstream').describe.remote().result()))"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
        return json.loads(result.stdout.strip().splitlines()[-1])

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""


def wait_until(condition: Callable[[], Any], timeout_s: float, what: str, service: Service | None = None) -> Any:
    return support.wait_until(condition, timeout_s, what, detail=service.log_tail if service else str)


def start_ray(address_port: int, metrics_port: int, temp_dir: str, env: dict[str, str]) -> None:
    ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    require(ray is not None, "the ray CLI is not installed")
    assert ray is not None
    subprocess.run(
        [
            ray, "start", "--head", f"--port={address_port}", "--node-ip-address=127.0.0.1", f"--metrics-export-port={metrics_port}",
            f"--dashboard-port={free_port()}", "--dashboard-host=127.0.0.1", "--num-cpus=4", "--object-store-memory=300000000",
            f"--temp-dir={temp_dir}", "--disable-usage-stats",
        ],
        env=env, check=True, capture_output=True, timeout=180,
    )  # fmt: skip


def stop_ray(env: dict[str, str]) -> None:
    ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or "ray"
    subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, shared_clips: dict[str, Path]) -> Iterator[Service]:
    work = tmp_path_factory.mktemp("service")
    redis_server = RedisServer(work)
    redis_server.start()
    rtsp = RtspServer(shared_clips[CLIP], free_port(), work / "rtsp.log")
    rtsp.start()
    # Ray's unix sockets must fit in 107 bytes: keep its session directory short.
    ray_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    # Token auth off, explicitly: a loopback-only test cluster; with a ~/.ray/auth_token left on the
    # machine, Ray 2.60 would otherwise demand a token that `serve run` does not send.
    env = {**os.environ, "FERSTREAM_REDIS_URL": redis_server.url, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}
    ray_port, metrics_port, http_port = free_port(), free_port(), free_port()

    # The shipped CPU config, on free ports and without the demo camera.
    config = yaml.safe_load((REPO_ROOT / "configs/serve-cpu.yaml").read_text())
    config["http_options"]["port"] = http_port
    config["applications"][0]["args"]["cameras_file"] = None
    config_path = work / "serve.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = work / "serve.log"
    serve_process: subprocess.Popen[bytes] | None = None
    try:
        start_ray(ray_port, metrics_port, ray_dir, env)
        ray_address = f"127.0.0.1:{ray_port}"
        serve_cli = shutil.which("serve", path=str(Path(sys.executable).parent)) or "serve"
        with log_path.open("wb") as log:
            serve_process = subprocess.Popen(
                [serve_cli, "run", "--address", ray_address, str(config_path)], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        service = Service(f"http://127.0.0.1:{http_port}", redis_server.url, ray_address, metrics_port, rtsp, log_path)

        def healthy() -> bool:
            assert serve_process is not None and serve_process.poll() is None, f"serve run exited\n{service.log_tail()}"
            try:
                return requests.get(f"{service.api}/healthz", timeout=5).status_code == 200
            except requests.RequestException:  # the proxy answers before the app is deployed
                return False

        wait_until(healthy, 300, "the Serve app to become healthy", service)
        yield service
    finally:
        if serve_process is not None and serve_process.poll() is None:
            serve_process.send_signal(signal.SIGINT)  # serve run shuts the app down on Ctrl-C
            try:
                serve_process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                serve_process.kill()
        stop_ray(env)
        rtsp.stop()
        redis_server.stop()
        shutil.rmtree(ray_dir, ignore_errors=True)


def post_stream(service: Service, body: dict[str, Any]) -> requests.Response:
    return requests.post(f"{service.api}/streams", json=body, timeout=10)


def test_bad_requests_get_4xx_with_the_reason(service):
    assert requests.get(f"{service.api}/healthz", timeout=10).json() == {"status": "ok"}
    bad_scheme = post_stream(service, {"id": "x", "url": "ftp://host/video"})
    assert bad_scheme.status_code == 422 and "unsupported URL scheme" in bad_scheme.text
    bad_fps = post_stream(service, {"id": "x", "url": "rtsp://h/s", "fps": -1})
    assert bad_fps.status_code == 422 and "target_fps" in bad_fps.text
    assert post_stream(service, {"url": "rtsp://h/s"}).status_code == 422  # no id
    assert post_stream(service, {"id": "x", "url": "rtsp://h/s", "options": {"nonsense": 1}}).status_code == 422
    assert requests.delete(f"{service.api}/streams/nope", timeout=10).status_code == 404


def test_an_rtsp_camera_added_over_http_produces_valid_events_with_stable_tracks(service):
    response = post_stream(service, {"id": "lobby", "url": service.rtsp.url, "fps": 5, "transport": "tcp", "options": FAST_RECONNECT})
    assert response.status_code == 201, response.text
    assert post_stream(service, {"id": "lobby", "url": service.rtsp.url}).status_code == 409

    wait_until(lambda: service.event_count("lobby") >= 60, 240, "60 events from the RTSP camera", service)
    events = service.events("lobby")
    for event in events:
        validate_event_dict(event.to_json_dict())
    faces_per_frame = Counter(event.frame_index for event in events)
    two_faces = sum(count == 2 for count in faces_per_frame.values())
    assert two_faces >= 0.8 * len(faces_per_frame), f"2 faces in {two_faces}/{len(faces_per_frame)} frames"
    tracks = Counter(event.track_id for event in events)
    assert sum(count for _id, count in tracks.most_common(2)) >= 0.9 * len(events), f"fragmented tracks: {tracks}"

    stream = service.streams()["lobby"]
    assert stream["state"] == "streaming"
    assert 0 < stream["measured_fps"] <= 5.5
    assert stream["last_frame_time"] > time.time() - 30


def test_prometheus_scrapes_pipeline_and_serve_metrics(service, tmp_path):
    prometheus = PrometheusServer(free_port(), tmp_path / "prometheus", targets=[f"127.0.0.1:{service.metrics_port}"])
    prometheus.start()
    try:
        processed = prometheus.wait_for('sum(ray_ferstream_frames_processed_total{camera="lobby"})', timeout_s=90)
        assert sample_value(processed[0]) > 0
        faces = prometheus.wait_for('sum(ray_ferstream_faces_detected_total{camera="lobby"})', timeout_s=30)
        assert sample_value(faces[0]) >= sample_value(processed[0])  # two people in most frames
        # A quantile from the buckets: Ray exports histogram _sum from bucket midpoints, so sum/count is no mean.
        latency = prometheus.wait_for(
            'histogram_quantile(0.5, sum by (le) (ray_ferstream_end_to_end_latency_seconds_bucket{camera="lobby"}))', timeout_s=30
        )
        assert 0 < sample_value(latency[0]) < 10, "median capture-to-publish latency in seconds"
        for deployment in ("FaceDetector", "ExpressionClassifier"):
            served = prometheus.wait_for(
                f'sum(ray_serve_deployment_processing_latency_ms_count{{deployment="{deployment}"}})', timeout_s=60
            )
            assert sample_value(served[0]) > 0
        batches = prometheus.wait_for("sum(ray_serve_batches_processed_total)", timeout_s=60)
        assert sample_value(batches[0]) > 0
    finally:
        prometheus.stop()


def test_the_camera_comes_back_after_the_rtsp_server_restarts(service):
    before = service.streams()["lobby"]["reconnects"]
    service.rtsp.stop()
    time.sleep(4)
    restarted_at = time.time()
    service.rtsp.start()
    wait_until(
        lambda: any(event.capture_time > restarted_at + 1 for event in service.events("lobby")[-10:]),
        120,
        "events from after the RTSP server restart",
        service,
    )
    # The status in the registry is up to a reconcile interval old: wait for it to catch up.
    stream = wait_until(lambda: (s := service.streams()["lobby"])["state"] == "streaming" and s, 30, "status streaming", service)
    assert stream["reconnects"] > before


def test_a_camera_with_a_bad_url_does_not_stop_the_good_one(service):
    dead = f"rtsp://127.0.0.1:{free_port()}/nothing-here"
    assert post_stream(service, {"id": "broken", "url": dead, "options": FAST_RECONNECT}).status_code == 201
    wait_until(lambda: service.streams()["broken"]["reconnects"] >= 2, 60, "reconnect attempts of the broken camera", service)
    broken = service.streams()["broken"]
    assert broken["state"] in ("reconnecting", "connecting") and broken["last_error"]
    count = service.event_count("lobby")
    wait_until(lambda: service.event_count("lobby") >= count + 20, 60, "the good camera to keep producing", service)
    assert service.event_count("broken") == 0


def test_removing_cameras_stops_their_decoding_without_leaks(service):
    wait_until(lambda: set(service.ingest()["cameras"]) == {"lobby", "broken"}, 30, "both cameras on the ingest replica", service)
    for camera_id in ("broken", "lobby"):
        assert requests.delete(f"{service.api}/streams/{camera_id}", timeout=10).status_code == 204
    assert service.streams() == {}

    def stopped() -> bool:
        ingest = service.ingest()
        return not ingest["cameras"] and not ingest["threads"]

    wait_until(stopped, 60, "the ingest replica to stop the cameras and their threads", service)
    count = service.event_count("lobby")
    time.sleep(3)
    assert service.event_count("lobby") == count, "no events after removal"
