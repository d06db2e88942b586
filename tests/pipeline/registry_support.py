"""Helpers of the registry tests (their fixtures, `client` and `registry`, are in conftest.py)."""

from __future__ import annotations

import time

import redis

from pipeline.config import SourceConfig

PREFIX = "test"


def camera(camera_id: str, url: str = "rtsp://cam.local/stream", **fields: object) -> SourceConfig:
    return SourceConfig.model_validate({"camera_id": camera_id, "url": url, **fields})


def lease_key(camera_id: str, prefix: str = PREFIX) -> str:
    return f"{prefix}:lease:{camera_id}"


def wait_until_gone(client: redis.Redis, key: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while client.exists(key):
        assert time.monotonic() < deadline, f"{key} did not expire within {timeout_s}s"
        time.sleep(0.02)
