"""A running Serve app for the end-to-end tests: a local Ray head (``ray start``) and the app
started with ``serve run`` on a copy of a shipped Serve config, as the README tells users to do.
The copy changes only what a test must change (ports, start-up cameras, the pipeline config)."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import requests
import yaml

from pipeline.events import ExpressionEvent, stream_key
from tests import support
from tests.conftest import REPO_ROOT, RedisServer, free_port, require

# What serve.status() says about the app: its status and each deployment's status and message.
APP_STATUS = (
    "app = serve.status().applications.get('ferstream'); "
    "print(json.dumps(None if app is None else {'status': str(app.status), 'message': app.message, "
    "'deployments': {name: {'status': str(d.status), 'message': d.message} for name, d in app.deployments.items()}}))"
)
AUTH_ENV = ("FERSTREAM_API_TOKENS", "FERSTREAM_API_TOKEN_FILE", "FERSTREAM_API_AUTH")


@dataclass
class Service:
    api: str
    redis_url: str
    ray_address: str
    metrics_port: int
    log_path: Path
    token: str | None = None
    ray_dir: Path | None = None

    @property
    def headers(self) -> dict[str, str]:
        """What every API call but /healthz sends."""
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def events(self, camera_id: str) -> list[ExpressionEvent]:
        client = redis.Redis.from_url(self.redis_url)
        return [ExpressionEvent.from_fields(fields) for _id, fields in client.xrange(stream_key("ferstream", camera_id))]

    def event_count(self, camera_id: str) -> int:
        return int(redis.Redis.from_url(self.redis_url).xlen(stream_key("ferstream", camera_id)))

    def streams(self) -> dict[str, dict[str, Any]]:
        response = requests.get(f"{self.api}/streams", headers=self.headers, timeout=10)
        response.raise_for_status()
        return {stream["camera_id"]: stream for stream in response.json()}

    def post_stream(self, body: dict[str, Any]) -> requests.Response:
        return requests.post(f"{self.api}/streams", json=body, headers=self.headers, timeout=10)

    def delete_stream(self, camera_id: str) -> requests.Response:
        return requests.delete(f"{self.api}/streams/{camera_id}", headers=self.headers, timeout=10)

    def app_status(self) -> dict[str, Any] | None:
        return self.ray_driver(APP_STATUS)

    def _driver_command(self, code: str) -> list[str]:
        prelude = (
            f"import json, ray; from ray import serve; ray.init(address={self.ray_address!r}, logging_level='ERROR', log_to_driver=False); "
        )
        return [sys.executable, "-c", prelude + code]

    def ray_driver(self, code: str) -> Any:
        """Run ``code`` (which must print one JSON line last) as a separate Ray driver on this cluster."""
        command = self._driver_command(code)
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False, env=cluster_env())
        if result.returncode != 0:
            raise AssertionError(f"Ray driver exited {result.returncode}:\n{result.stderr[-3000:]}")
        return json.loads(result.stdout.strip().splitlines()[-1])

    def ray_driver_in_background(self, code: str) -> subprocess.Popen[str]:
        """:meth:`ray_driver` without waiting: for a call that blocks while the test does something else."""
        command = self._driver_command(code)
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=cluster_env())

    def ingest(self) -> dict[str, Any]:
        """Ingest.describe() through a Serve handle."""
        return self.ray_driver("print(json.dumps(serve.get_deployment_handle('Ingest', 'ferstream').describe.remote().result()))")

    def ray_logs_containing(self, text: str) -> list[Path]:
        """The files of this cluster's Ray logs (every process's, Serve's replicas' included) that contain ``text``."""
        assert self.ray_dir is not None
        return [
            path for path in sorted(self.ray_dir.glob("session_*/logs/**/*")) if path.is_file() and text in path.read_text(errors="replace")
        ]

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""

    def wait_until(self, condition: Callable[[], Any], timeout_s: float, what: str) -> Any:
        return support.wait_until(condition, timeout_s, what, detail=self.log_tail)


def cluster_env() -> dict[str, str]:
    """The environment of every process of a test cluster, its drivers included: token auth off,
    explicitly, on a loopback-only cluster. With a ~/.ray/auth_token on the machine (an earlier local
    ``ray.init``, the automl test's, writes one), Ray 2.60 turns token auth on in a process that does
    not say otherwise; a driver that did would refuse the replies of replicas that send no token, and
    its handle calls would hang."""
    return {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


def ray_cli(name: str) -> str:
    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    require(path is not None, f"the {name} CLI is not installed")
    assert path is not None
    return path


def start_ray(address_port: int, metrics_port: int, temp_dir: str, env: dict[str, str], resources: Sequence[str]) -> None:
    # Every port Ray would otherwise take at its fixed default (client server 10001, the dashboard
    # agent's, the runtime-env agent's) is a free one, so that two clusters on one machine can coexist.
    result = subprocess.run(
        [
            ray_cli("ray"), "start", "--head", f"--port={address_port}", "--node-ip-address=127.0.0.1",
            f"--metrics-export-port={metrics_port}", f"--dashboard-port={free_port()}", "--dashboard-host=127.0.0.1", *resources,
            f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
            "--object-store-memory=300000000", f"--temp-dir={temp_dir}", "--disable-usage-stats",
        ],
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, f"ray start failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"


def cluster_pids(temp_dir: str, gcs_port: int) -> list[int]:
    """This cluster's processes: those naming its temp dir or its GCS port, and their descendants."""
    table: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        table[int(entry.name)] = (ppid, command)
    gcs = re.compile(rf"address[= ]\S*:{gcs_port}(?!\d)")
    ancestors, pid = set(), os.getpid()  # this test process and its parents are never part of it
    while pid in table and pid not in ancestors:
        ancestors.add(pid)
        pid = table[pid][0]
    found = {pid for pid, (_ppid, command) in table.items() if temp_dir in command or gcs.search(command)} - ancestors
    grew = True
    while grew:
        children = {pid for pid, (ppid, _command) in table.items() if ppid in found} - found - ancestors
        found |= children
        grew = bool(children)
    return sorted(found)


def stop_ray(temp_dir: str, gcs_port: int) -> None:
    """Stop this cluster only: ``ray stop --force`` would kill every Ray process on the machine,
    other tests' and other users' clusters included."""
    pids = cluster_pids(temp_dir, gcs_port)
    for sig, wait_s in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() and not _zombie(pid) for pid in pids):
            time.sleep(0.2)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


@contextmanager
def running_service(
    work: Path,
    serve_config: str,
    redis_url: str,
    resources: Sequence[str] = ("--num-cpus=4",),
    pipeline_overrides: dict[str, dict[str, Any]] | None = None,
    deployment_overrides: dict[str, dict[str, Any]] | None = None,
    http_host: str = "127.0.0.1",
    api_token: str | None = "generate",
    wait_healthy: bool = True,
) -> Iterator[Service]:
    """``serve run`` on a copy of ``configs/<serve_config>`` on free ports, without start-up cameras;
    ``pipeline_overrides`` (section -> fields) are applied to a copy of its pipeline config,
    ``deployment_overrides`` (deployment name -> fields, e.g. ``{"Ingest": {"num_replicas": 2}}``) to
    the copy's deployments.

    The API needs a token: a fresh one by default, in ``FERSTREAM_API_TOKENS`` of the Ray head (whose
    environment the replicas inherit), never in the app's arguments; ``api_token=None``: none.
    ``http_host``: where Serve's proxy binds. ``wait_healthy=False`` yields as soon as ``serve run``
    started, for tests of an app that must not come up."""
    # Ray's unix sockets must fit in 107 bytes: keep its session directory short.
    ray_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    env = {**cluster_env(), "FERSTREAM_REDIS_URL": redis_url}
    for name in AUTH_ENV:  # only what this test asks for
        env.pop(name, None)
    token = secrets.token_hex(32) if api_token == "generate" else api_token
    if token is not None:
        env["FERSTREAM_API_TOKENS"] = token
    ray_port, metrics_port, http_port = free_port(), free_port(), free_port()

    config = yaml.safe_load((REPO_ROOT / "configs" / serve_config).read_text())
    config["http_options"].update(host=http_host, port=http_port)
    args = config["applications"][0]["args"]
    args["cameras_file"] = None
    deployments = {deployment["name"]: deployment for deployment in config["applications"][0]["deployments"]}
    for name, fields in (deployment_overrides or {}).items():
        deployments[name].update(fields)  # a KeyError names a deployment the config does not have
    if pipeline_overrides:
        pipeline = yaml.safe_load((REPO_ROOT / args["pipeline_config"]).read_text())
        for section, fields in pipeline_overrides.items():
            current = pipeline.setdefault(section, {})
            if "kind" in fields and fields["kind"] != current.get("kind"):
                pipeline[section] = dict(fields)  # another kind (detector: mtcnn) has other fields: start afresh
            else:
                current.update(fields)
        args["pipeline_config"] = str(work / "pipeline.yaml")
        (work / "pipeline.yaml").write_text(yaml.safe_dump(pipeline))
    config_path = work / "serve.yaml"
    config_path.write_text(yaml.safe_dump(config))
    log_path = work / "serve.log"
    serve_process: subprocess.Popen[bytes] | None = None
    try:
        start_ray(ray_port, metrics_port, ray_dir, env, resources)
        ray_address = f"127.0.0.1:{ray_port}"
        with log_path.open("wb") as log:
            command = [ray_cli("serve"), "run", "--address", ray_address, str(config_path)]
            serve_process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        service = Service(f"http://127.0.0.1:{http_port}", redis_url, ray_address, metrics_port, log_path, token, Path(ray_dir))

        def healthy() -> bool:
            assert serve_process is not None and serve_process.poll() is None, f"serve run exited\n{service.log_tail()}"
            try:
                return requests.get(f"{service.api}/healthz", timeout=5).status_code == 200
            except requests.RequestException:  # the proxy answers before the app is deployed
                return False

        if wait_healthy:
            service.wait_until(healthy, 300, "the Serve app to become healthy")
        yield service
    finally:
        if serve_process is not None and serve_process.poll() is None:
            serve_process.send_signal(signal.SIGINT)  # serve run shuts the app down on Ctrl-C
            try:
                serve_process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                serve_process.kill()
        stop_ray(ray_dir, ray_port)
        shutil.rmtree(ray_dir, ignore_errors=True)


@contextmanager
def service_with_its_own_redis(work: Path, serve_config: str = "serve-cpu.yaml", **options: Any) -> Iterator[Service]:
    """:func:`running_service` with a redis-server of its own, started first and stopped last."""
    redis_server = RedisServer(work)
    redis_server.start()
    try:
        with running_service(work, serve_config, redis_server.url, **options) as service:
            yield service
    finally:
        redis_server.stop()
