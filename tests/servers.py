"""Real servers for integration tests: a looping RTSP camera and a Prometheus, on free loopback ports.

Both come from Debian packages (see ``RTSP_PACKAGES`` and ``PROMETHEUS_PACKAGES``) and are
started by the tests themselves; a missing package skips outside CI and fails in CI (``require``).

* ``RtspServer`` runs ``scripts/rtsp_server.py`` (GStreamer's RTSP server) with Debian's system
  python3, because the venv's python cannot import ``gi``. It serves one clip in a loop forever
  at ``.url`` (``rtsp://127.0.0.1:PORT/cam``), over RTSP/TCP and RTP/UDP, to several clients
  at once, paced at the clip's real frame rate. ``stop()`` and ``start()`` again reuse the same
  port, so a test can cut a client off and watch it reconnect.
* ``PrometheusServer`` runs ``prometheus`` with a generated config: a 1 s scrape interval and
  a ``file_sd_configs`` file, so ``add_targets`` can point it at an app's port after it
  started. ``query`` and ``wait_for`` use the HTTP API. Note that Prometheus batches target
  discovery every 5 s (hard-coded in 2.x), so a new target's first sample takes 5-10 s.

Fixtures: ``rtsp_server`` (the head-pose clip at /cam, started), ``rtsp_server_factory``,
``prometheus_server`` (no targets yet, started) and ``prometheus_factory``. Every server a
fixture starts is stopped at teardown, also when the test failed; the child processes run
under ``setpriv --pdeathsig`` too, so even a killed pytest does not leak them.

Register the fixtures with ``pytest_plugins = ["tests.servers"]`` in tests/conftest.py, or import
them there (``from tests.servers import rtsp_server, ...``).

PYTEST_DONT_REWRITE: this module holds no test assertions, and the marker keeps pytest from
warning that it was imported before being registered as a plugin.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar

import pytest

# The module, not `from tests.conftest import ...`: names resolve at call time, so this still
# works when conftest itself imports this module (a circular, half-initialised import).
from tests import conftest

REPO_ROOT = Path(__file__).resolve().parents[1]
RTSP_SCRIPT = REPO_ROOT / "scripts" / "rtsp_server.py"
# Debian's interpreter, where python3-gi lives; `python3` on PATH may be the venv's or pyenv's.
SYSTEM_PYTHON = os.environ.get("FERSTREAM_SYSTEM_PYTHON", "/usr/bin/python3")
RTSP_PACKAGES = "python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good gstreamer1.0-plugins-bad"
PROMETHEUS_PACKAGES = "prometheus"
DEFAULT_CLIP = "head-pose-face-detection-female-and-male"

ProcessT = TypeVar("ProcessT", bound="ManagedProcess")

# What scripts/rtsp_server.py needs, checked in the interpreter that will run it.
_RTSP_PROBE = """
import gi
gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import Gst, GstRtspServer
Gst.init(None)
missing = [name for name in ("appsrc", "appsink", "qtdemux", "h264parse", "rtph264pay") if Gst.ElementFactory.find(name) is None]
if missing:
    raise SystemExit("missing GStreamer elements: " + ", ".join(missing))
"""


@functools.cache
def rtsp_server_support() -> tuple[bool, str]:
    """(available, why not): whether the system python3 can run scripts/rtsp_server.py."""
    if not Path(SYSTEM_PYTHON).exists():
        return False, f"{SYSTEM_PYTHON} does not exist (apt-get install {RTSP_PACKAGES})"
    probe = subprocess.run([SYSTEM_PYTHON, "-c", _RTSP_PROBE], capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        detail = (probe.stderr.strip().splitlines() or ["unknown error"])[-1]
        return False, f"GStreamer's RTSP server is not usable from {SYSTEM_PYTHON}: {detail} (apt-get install {RTSP_PACKAGES})"
    return True, ""


def _pdeathsig_prefix() -> list[str]:
    """Run children under `setpriv --pdeathsig TERM` (util-linux) so that they die with pytest.

    The kernel signals the child when the *thread* that forked it exits; fixtures start
    servers from pytest's main thread, so that is the whole test session.
    """
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM"] if setpriv else []


class ManagedProcess:
    """A server child process whose output goes to a log file that errors quote."""

    def __init__(self, name: str, log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._log_start = 0  # where this run's output starts in the (appended) log file

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def _spawn(self, argv: Sequence[str]) -> None:
        if self.running:
            raise RuntimeError(f"{self.name} is already running")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self._log_start = self._log.tell()
        self._process = subprocess.Popen(
            [*_pdeathsig_prefix(), *argv],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # Its own session: Ctrl-C reaches pytest only, and the fixture's teardown stops the server.
            start_new_session=True,
        )

    def log_text(self) -> str:
        """This run's output so far."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_start)
                return log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def _log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def _wait_until_ready(self, ready: Callable[[], bool], timeout_s: float) -> None:
        """Wait for ``ready()``; stop the child and raise with its log if it exits or times out."""
        deadline = time.monotonic() + timeout_s
        while True:
            if not self.running:
                code = self._process.returncode if self._process is not None else None
                tail = self._log_tail()
                self.stop()
                raise RuntimeError(f"{self.name} exited with status {code} while starting:\n{tail}")
            if ready():
                return
            if time.monotonic() > deadline:
                tail = self._log_tail()
                self.stop()
                raise TimeoutError(f"{self.name} was not ready after {timeout_s}s:\n{tail}")
            time.sleep(0.05)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Terminate (then kill) the child; safe to call twice or before start."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=timeout_s)
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self: ProcessT) -> ProcessT:
        """``with`` stops the server on the way out, whatever happened; ``start()`` stays explicit."""
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


class RtspServer(ManagedProcess):
    """scripts/rtsp_server.py serving ``clip`` in a loop at rtsp://127.0.0.1:``port````mount``."""

    def __init__(self, clip: Path, port: int, log_path: Path, mount: str = "/cam", shared: bool = False) -> None:
        super().__init__(f"rtsp server on :{port}", log_path)
        self.clip = clip
        self.port = port
        self.mount = mount
        self.shared = shared
        self.url = f"rtsp://127.0.0.1:{port}{mount}"

    def start(self, timeout_s: float = 20.0) -> None:
        available, reason = rtsp_server_support()
        conftest.require(available, reason)
        argv = [SYSTEM_PYTHON, str(RTSP_SCRIPT), str(self.clip), "--host", "127.0.0.1", "--port", str(self.port), "--mount", self.mount]
        if self.shared:
            argv.append("--shared")
        self._spawn(argv)
        # The script prints READY after the clip is loaded and the socket listens, so the first
        # client is served at once (polling the port could connect before the mount exists).
        self._wait_until_ready(lambda: "READY" in self.log_text(), timeout_s)


class PrometheusServer(ManagedProcess):
    """Debian's prometheus on 127.0.0.1:``port``, scraping file_sd targets every ``scrape_interval_s``."""

    def __init__(
        self,
        port: int,
        work_dir: Path,
        targets: Sequence[str] = (),
        scrape_interval_s: float = 1.0,
        job: str = "ferstream",
    ) -> None:
        super().__init__(f"prometheus on :{port}", work_dir / "prometheus.log")
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.job = job
        self.work_dir = work_dir
        self.config_path = work_dir / "prometheus.yml"
        self.targets_path = work_dir / "targets.json"
        self.scrape_interval_s = scrape_interval_s
        # file_sd groups: one per add_targets call, so each can carry its own labels.
        self._groups: list[dict[str, Any]] = []
        if targets:
            self._groups.append({"targets": list(targets), "labels": {}})

    @property
    def targets(self) -> list[str]:
        return [target for group in self._groups for target in group["targets"]]

    def _write_targets(self) -> None:
        # Write then rename: Prometheus watches the file and must never read it half written.
        partial = self.targets_path.with_name(self.targets_path.name + ".tmp")
        partial.write_text(json.dumps(self._groups))
        partial.replace(self.targets_path)

    def _write_config(self) -> None:
        interval = f"{max(1, round(self.scrape_interval_s * 1000))}ms"
        config = {
            "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
            "scrape_configs": [
                {
                    "job_name": self.job,
                    # All targets come through the file (the initial ones too), so there is one
                    # mechanism and a test can add more while Prometheus runs. refresh_interval is
                    # only the fallback for a missed inotify event.
                    "file_sd_configs": [{"files": [str(self.targets_path)], "refresh_interval": "1s"}],
                }
            ],
        }
        self.config_path.write_text(json.dumps(config, indent=2))  # JSON is valid YAML

    def start(self, timeout_s: float = 30.0) -> None:
        binary = shutil.which("prometheus")
        conftest.require(binary is not None, f"prometheus is not installed (apt-get install {PROMETHEUS_PACKAGES})")
        assert binary is not None
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._write_targets()
        self._write_config()
        self._spawn(
            [
                binary,
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.work_dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ]
        )
        self._wait_until_ready(self._is_ready, timeout_s)

    def _is_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def add_targets(self, targets: Sequence[str], labels: Mapping[str, str] | None = None) -> None:
        """Scrape ``targets`` (host:port) from now on, with extra target ``labels``."""
        self._groups.append({"targets": list(targets), "labels": dict(labels or {})})
        self._write_targets()

    def _get(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        url = f"{self.url}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as error:
            # Bad PromQL is a 400 whose body says why: show that, not just the status.
            raise RuntimeError(f"GET {url} failed: {error.code} {error.read().decode(errors='replace')}") from error
        if body.get("status") != "success":
            raise RuntimeError(f"GET {url} failed: {body}")
        return body["data"]

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query; returns the result list (for a vector: ``{"metric": {...}, "value": [ts, "v"]}``)."""
        data = self._get("/api/v1/query", {"query": promql})
        result = data["result"]
        # Scalars and strings come back as one [ts, "v"] pair; wrap them like a one-sample vector.
        return result if data["resultType"] in ("vector", "matrix") else [{"metric": {}, "value": result}]

    def wait_for(
        self,
        promql: str,
        predicate: Callable[[list[dict[str, Any]]], bool] = bool,
        timeout_s: float = 30.0,
        poll_s: float = 0.25,
    ) -> list[dict[str, Any]]:
        """Poll ``query(promql)`` until ``predicate(results)`` holds (default: any result); return them."""
        deadline = time.monotonic() + timeout_s
        while True:
            results = self.query(promql)
            if predicate(results):
                return results
            if time.monotonic() > deadline:
                raise TimeoutError(f"{promql!r} did not match within {timeout_s}s: last {results}; targets {self.target_health()}")
            time.sleep(poll_s)

    def target_health(self) -> dict[str, str]:
        """``{"host:port": "up" | "down" | "unknown"}`` for the active targets."""
        data = self._get("/api/v1/targets", {"state": "active"})
        return {target["labels"]["instance"]: target["health"] for target in data["activeTargets"]}

    def wait_for_target(self, target: str, health: str = "up", timeout_s: float = 30.0) -> None:
        """Wait until Prometheus has scraped ``target`` with the given health."""
        deadline = time.monotonic() + timeout_s
        while self.target_health().get(target) != health:
            if time.monotonic() > deadline:
                raise TimeoutError(f"target {target} not {health} within {timeout_s}s: {self.target_health()}")
            time.sleep(0.25)


def sample_value(result: Mapping[str, Any]) -> float:
    """The float value of one instant-query result."""
    return float(result["value"][1])


class RtspServerFactory(Protocol):
    def __call__(self, clip: Path, *, mount: str = "/cam", shared: bool = False, port: int | None = None) -> RtspServer: ...


class PrometheusFactory(Protocol):
    def __call__(self, targets: Sequence[str] = (), *, scrape_interval_s: float = 1.0) -> PrometheusServer: ...


def _stop_all(servers: Sequence[ManagedProcess]) -> None:
    errors: list[BaseException] = []
    for server in servers:
        try:
            server.stop()
        except Exception as error:  # stop the others anyway, then report
            errors.append(error)
    if errors:
        raise errors[0]


@pytest.fixture
def rtsp_server_factory(tmp_path: Path) -> Iterator[RtspServerFactory]:
    """Start looping RTSP servers (``make(clip, mount=..., shared=..., port=...)``); all stopped at teardown."""
    servers: list[RtspServer] = []

    def make(clip: Path, *, mount: str = "/cam", shared: bool = False, port: int | None = None) -> RtspServer:
        chosen = port if port is not None else conftest.free_port()
        server = RtspServer(clip, chosen, tmp_path / f"rtsp-{chosen}.log", mount=mount, shared=shared)
        servers.append(server)  # before start(): a half-started server is stopped too
        server.start()
        return server

    try:
        yield make
    finally:
        _stop_all(servers)


@pytest.fixture
def rtsp_server(rtsp_server_factory: RtspServerFactory, shared_clips: dict[str, Path]) -> RtspServer:
    """The head-pose clip (56 frames, 480x270, 12.5 fps) looping at rtsp://127.0.0.1:PORT/cam."""
    return rtsp_server_factory(shared_clips[DEFAULT_CLIP])


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[PrometheusFactory]:
    """Start Prometheus servers scraping ``targets`` (host:port); all stopped at teardown."""
    servers: list[PrometheusServer] = []

    def make(targets: Sequence[str] = (), *, scrape_interval_s: float = 1.0) -> PrometheusServer:
        server = PrometheusServer(conftest.free_port(), tmp_path / f"prometheus-{len(servers)}", targets, scrape_interval_s)
        servers.append(server)
        server.start()
        return server

    try:
        yield make
    finally:
        _stop_all(servers)


@pytest.fixture
def prometheus_server(prometheus_factory: PrometheusFactory) -> PrometheusServer:
    """A started Prometheus with no targets yet: ``add_targets([...])`` the app's metrics port."""
    return prometheus_factory()
