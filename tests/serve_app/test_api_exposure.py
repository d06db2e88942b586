"""``serve run`` with Serve's HTTP proxy on 0.0.0.0 and no API token: the Controller refuses to
start, saying what to set, and the API never answers."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import requests

from tests.conftest import RedisServer
from tests.serve_app.serving import running_service

pytestmark = pytest.mark.integration

REFUSAL = "refusing to start the HTTP API without authentication on a non-loopback host (0.0.0.0)"


def test_no_token_on_a_non_loopback_host_refuses_to_start(tmp_path: Path, redis_server: RedisServer) -> None:
    with running_service(tmp_path, "serve-cpu.yaml", redis_server.url, http_host="0.0.0.0", api_token=None, wait_healthy=False) as service:
        # The replica's error, as Serve logs it (the Controller's replica log and Serve's controller log).
        logs = service.wait_until(lambda: service.ray_logs_containing(REFUSAL), 300, "the Controller to refuse to start")
        text = logs[0].read_text(errors="replace")
        assert "FERSTREAM_API_TOKENS" in text and "FERSTREAM_API_TOKEN_FILE" in text and "FERSTREAM_API_AUTH=disabled" in text
        time.sleep(5)  # Serve retries the replica: it fails the same way each time
        try:
            answered = requests.get(f"{service.api}/healthz", timeout=5).status_code
        except requests.RequestException:
            answered = None
        assert answered != 200
