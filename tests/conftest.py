"""Shared fixtures: the ../shared material and real servers on free loopback ports."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import RedisServer, free_port, wait_for_port, wait_until  # noqa: F401 - re-exported to the tests

REPO_ROOT = Path(__file__).resolve().parents[1]

# Real RTSP and Prometheus servers (tests/servers.py).
pytest_plugins = ["tests.servers"]


def require(condition: bool, reason: str) -> None:
    """Skip outside CI; in CI a missing prerequisite is a failure, never a silent skip."""
    if condition:
        return
    if os.environ.get("CI"):
        pytest.fail(f"CI is set but {reason}")
    pytest.skip(reason)


def shared_root() -> Path:
    return Path(os.environ.get("FERSTREAM_SHARED", REPO_ROOT.parent / "shared")).resolve()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    root = shared_root()
    require(root.is_dir(), f"the shared material is missing at {root} (set FERSTREAM_SHARED)")
    return root


@pytest.fixture(scope="session")
def shared_clips(shared_dir: Path) -> dict[str, Path]:
    clips = {path.stem: path for path in sorted((shared_dir / "media").glob("*.mp4"))}
    require(len(clips) >= 2, f"expected the sample clips in {shared_dir / 'media'}")
    return clips


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port, stopped (and restartable) by the test."""
    require(shutil.which("redis-server") is not None, "redis-server is not installed (apt-get install redis-server)")
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()
