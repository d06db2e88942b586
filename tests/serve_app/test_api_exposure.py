"""``serve run`` with Serve's HTTP proxy on 0.0.0.0 and no API token: the Controller refuses to
start, saying what to set, and the API never answers."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import RedisServer
from tests.serve_app.serving import running_service

pytestmark = pytest.mark.integration

REFUSAL = "refusing to start the HTTP API without authentication on a non-loopback host (0.0.0.0)"


def test_no_token_on_a_non_loopback_host_refuses_to_start(tmp_path: Path, redis_server: RedisServer) -> None:
    with running_service(tmp_path, "serve-cpu.yaml", redis_server.url, http_host="0.0.0.0", api_token=None, wait_healthy=False) as service:

        def refused() -> dict[str, Any] | None:
            try:
                status = service.app_status()
            except subprocess.CalledProcessError:  # Serve's controller is not up yet
                return None
            controller = (status or {}).get("deployments", {}).get("Controller", {})
            return status if REFUSAL in (controller.get("message") or "") else None

        status = service.wait_until(refused, 240, "the Controller to refuse to start")
        message = status["deployments"]["Controller"]["message"]
        assert "FERSTREAM_API_TOKENS" in message and "FERSTREAM_API_TOKEN_FILE" in message and "FERSTREAM_API_AUTH=disabled" in message
        assert "RUNNING" not in status["status"]
        try:
            answered = requests.get(f"{service.api}/healthz", timeout=5).status_code
        except requests.RequestException:
            answered = None
        assert answered != 200
