"""The ferstream Serve app on a private Ray cluster, for benchmarks: a redis-server, ``ray start
--head`` on free ports and ``serve run`` on a copy of ``configs/serve-cpu.yaml``, all torn down by
process id at the end (``ServeApp``). Used by ``serve_cameras.py``; see its docstring for what it measures."""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bench_common as common
import requests
import yaml
from bench_common import REPO_ROOT

log = logging.getLogger("ferstream.bench.serve")

SERVE_CONFIG = REPO_ROOT / "configs/serve-cpu.yaml"


def _cli(name: str) -> str:
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        raise SystemExit(f"the {name} CLI is not installed")
    return found


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, command line) for every process."""
    return {pid: (int(fields[1]), cmdline) for pid, (fields, cmdline) in common.proc_stat_table().items()}


@dataclass
class ServeApp:
    """redis-server + a private Ray head + ``serve run`` of the CPU config, on free ports."""

    work: Path
    num_cpus: int
    serve_config: Path = SERVE_CONFIG
    redis: common.RedisServer | None = None
    ray_dir: str = ""
    ports: dict[str, int] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    serve_process: subprocess.Popen[bytes] | None = None
    config: dict[str, Any] = field(default_factory=dict)
    # Directories the API may open file cameras from (url_policy.allowed_file_dirs of the app).
    file_dirs: Sequence[Path] = ()
    # The API's bearer token, given to the Ray head's environment, which the replicas inherit.
    token: str = field(default_factory=lambda: secrets.token_hex(32))

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.ports['http']}"

    @property
    def ray_address(self) -> str:
        return f"127.0.0.1:{self.ports['ray']}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.ports['dashboard']}"

    @property
    def log_path(self) -> Path:
        return self.work / "serve.log"

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def start(self) -> None:
        self.redis = common.RedisServer(self.work)
        self.redis.start()
        # Ray's unix socket paths must fit in 107 bytes: keep its directory short. Its name also
        # identifies this cluster's processes at teardown.
        self.ray_dir = tempfile.mkdtemp(prefix="ray-fsb-", dir="/tmp")
        names = ("ray", "metrics", "dashboard", "http", "agent_listen", "agent_grpc", "runtime_env", "client_server")
        self.ports = {name: common.free_port() for name in names}
        self.env = {**os.environ, "FERSTREAM_REDIS_URL": self.redis.url, "RAY_USAGE_STATS_ENABLED": "0"}
        # `ray start` turns token authentication on by default (Ray >= 2.5x), but a client such as
        # `serve run --address` only sends the token (~/.ray/auth_token) when RAY_AUTH_MODE says so.
        self.env.setdefault("RAY_AUTH_MODE", "token")
        self.env["FERSTREAM_API_TOKENS"] = self.token

        # The shipped CPU config, on a free HTTP port and without the demo cameras.
        self.config = yaml.safe_load(self.serve_config.read_text())
        self.config["http_options"]["port"] = self.ports["http"]
        args = self.config["applications"][0]["args"]
        args["cameras_file"] = None
        if self.file_dirs:
            # The API opens files only inside url_policy.allowed_file_dirs: a copy of the pipeline config allows the clips'.
            pipeline = yaml.safe_load((REPO_ROOT / args["pipeline_config"]).read_text()) or {}
            pipeline.setdefault("url_policy", {})["allowed_file_dirs"] = sorted({str(path) for path in self.file_dirs})
            args["pipeline_config"] = str(self.work / "pipeline.yaml")
            (self.work / "pipeline.yaml").write_text(yaml.safe_dump(pipeline))
        config_path = self.work / "serve.yaml"
        config_path.write_text(yaml.safe_dump(self.config))

        ports = self.ports
        subprocess.run(
            [
                _cli("ray"), "start", "--head", f"--port={ports['ray']}", "--node-ip-address=127.0.0.1",
                f"--metrics-export-port={ports['metrics']}", f"--dashboard-port={ports['dashboard']}", "--dashboard-host=127.0.0.1",
                f"--dashboard-agent-listen-port={ports['agent_listen']}", f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
                f"--runtime-env-agent-port={ports['runtime_env']}", f"--ray-client-server-port={ports['client_server']}",
                f"--num-cpus={self.num_cpus}", "--object-store-memory=300000000", f"--temp-dir={self.ray_dir}", "--disable-usage-stats",
            ],
            env=self.env, check=True, capture_output=True, timeout=180,
        )  # fmt: skip
        with self.log_path.open("wb") as log_file:
            self.serve_process = subprocess.Popen(
                [_cli("serve"), "run", "--address", self.ray_address, str(config_path)],
                cwd=REPO_ROOT,
                env=self.env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        common.wait_until(self.healthy, 300, "the Serve app's /healthz")
        common.wait_until(lambda: self.app_status() == "RUNNING", 300, "every deployment of the app to be running", interval_s=2.0)

    def check_alive(self) -> None:
        if self.serve_process is None or self.serve_process.poll() is not None:
            raise RuntimeError(f"serve run exited\n{self.log_tail()}")
        if not self.cluster_pids():
            raise RuntimeError("this benchmark's Ray cluster is gone (did someone run `ray stop --force`?)")

    def healthy(self) -> bool:
        self.check_alive()
        try:
            return requests.get(f"{self.api}/healthz", timeout=5).status_code == 200
        except requests.RequestException:  # the proxy answers before the app is deployed
            return False

    def serve_status(self) -> dict[str, Any]:
        result = subprocess.run(
            [_cli("serve"), "status", "--address", self.dashboard], env=self.env, capture_output=True, text=True, timeout=60
        )
        if result.returncode != 0:
            return {}
        return yaml.safe_load(result.stdout) or {}

    def app_status(self) -> str | None:
        self.check_alive()
        app = (self.serve_status().get("applications") or {}).get("ferstream") or {}
        return app.get("status")

    def own_pids(self) -> set[int]:
        """Everything this benchmark started: the Ray cluster, `serve run`, redis-server."""
        pids = set(self.cluster_pids())
        if self.serve_process is not None:
            pids.add(self.serve_process.pid)
        if self.redis is not None and self.redis.pid is not None:
            pids.add(self.redis.pid)
        return pids

    def cluster_pids(self) -> list[int]:
        """This cluster's processes: those naming its private temp dir, and their descendants."""
        if not self.ray_dir:
            return []
        table = _process_table()
        roots = {pid for pid, (_ppid, command) in table.items() if self.ray_dir in command and pid != os.getpid()}
        children: dict[int, list[int]] = defaultdict(list)
        for pid, (ppid, _command) in table.items():
            children[ppid].append(pid)
        found: set[int] = set()
        stack = list(roots)
        while stack:
            pid = stack.pop()
            if pid in found:
                continue
            found.add(pid)
            stack.extend(children.get(pid, []))
        return sorted(found)

    def stop(self, ray_stop_force: bool = False) -> None:
        if self.serve_process is not None and self.serve_process.poll() is None:
            self.serve_process.send_signal(signal.SIGINT)  # serve run deletes the app on Ctrl-C
            try:
                self.serve_process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.serve_process.kill()
                self.serve_process.wait(timeout=10)
        if self.ports and self.cluster_pids():
            subprocess.run(
                [_cli("serve"), "shutdown", "--address", self.dashboard, "--yes"], env=self.env, capture_output=True, timeout=120
            )
        self._stop_cluster()
        if ray_stop_force:
            subprocess.run([_cli("ray"), "stop", "--force"], env=self.env, capture_output=True, timeout=120)
        if self.redis is not None:
            self.redis.stop()
        if self.ray_dir:
            shutil.rmtree(self.ray_dir, ignore_errors=True)

    def _stop_cluster(self) -> None:
        pids = self.cluster_pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
            time.sleep(0.2)
        for pid in pids:
            if _alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        left = self.cluster_pids()
        if left:
            log.warning("Ray processes of this benchmark still running: %s", left)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rfind(")") + 2] != "Z"
