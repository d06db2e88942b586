"""Loopback ports, polling and a throw-away redis-server for the tests (``pipeline.local_servers``, shared with the
benchmarks), plus what only the tests need.

No pytest here; tests/conftest.py adds the skip-outside-CI / fail-in-CI policy on top.
"""

from __future__ import annotations

import subprocess

from pipeline.local_servers import RedisServer, free_port, wait_for_port, wait_until

__all__ = ["RedisServer", "free_port", "redis_server_requires_password", "wait_for_port", "wait_until"]


def redis_server_requires_password(port: int, password: str) -> None:
    """Turn AUTH on in a running redis-server (CONFIG SET requirepass), as a secured deployment has it."""
    subprocess.run(["redis-cli", "-p", str(port), "CONFIG", "SET", "requirepass", password], check=True, capture_output=True, timeout=10)
