"""API fuzz (issue 11): schemathesis against the Controller's own OpenAPI document, sent over HTTP to the app
of ``build_api`` under uvicorn, with a StreamController over a real redis-server (no Ray).

Every operation gets ``EXAMPLES`` generated requests that fit the schema and ``EXAMPLES`` that do not
(schemathesis' positive and, for the one body, negative mode), once with the token and once without. Only 2xx and 4xx may
come back, never a 5xx; without the token everything but ``GET /healthz`` is a 401; and the service
answers its probe and lists its cameras afterwards.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator

import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import Case, GenerationMode

from pipeline.auth import ApiAuth, ApiTokens
from pipeline.config import UrlPolicyConfig
from pipeline.registry import CameraRegistry
from serve_app.api import StreamController, build_api
from tests.conftest import RedisServer
from tests.serve_app.test_api import AUTH, TOKEN, ApiServer

pytestmark = pytest.mark.integration

EXAMPLES = 100  # at most, per operation, mode and token state
MAX_CAMERAS = 8
PRESENT = ("lobby", "dock")
log = logging.getLogger("test.api_fuzz")


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url, socket_timeout=2)
    yield client
    client.close()


@pytest.fixture
def api(client: redis.Redis) -> Iterator[tuple[ApiServer, schemathesis.BaseSchema]]:
    controller = StreamController(CameraRegistry(client, "fuzz"), UrlPolicyConfig(), MAX_CAMERAS, "per_camera")
    app = build_api(controller, ApiAuth(ApiTokens([TOKEN]), required=True))
    # The document the app serves (behind the token) is app.openapi(); loaded directly, it needs no request.
    schema = schemathesis.openapi.from_dict(app.openapi())
    with ApiServer(app) as server:
        yield server, schema


def takes_a_body(operation: schemathesis.APIOperation) -> bool:
    """Whether the operation has a request body. Only then can schemathesis make requests that break the schema:
    the others take nothing but a path string that any value fits."""
    definition = operation.schema.raw_schema["paths"][operation.path][operation.method.lower()]
    return "requestBody" in definition


def send_generated(
    server: ApiServer, operation: schemathesis.APIOperation, mode: GenerationMode, headers: dict[str, str] | None, seen: Counter
) -> None:
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def send(case: Case) -> None:
        # The generated headers go too, but the Authorization header is this run's own.
        merged = {name: value for name, value in (case.headers or {}).items() if name.lower() != "authorization"}
        response = case.call(base_url=server.url, headers={**merged, **(headers or {})}, timeout=10)
        seen[(operation.label, response.status_code)] += 1
        assert response.status_code < 500, (operation.label, mode, response.status_code, response.text[:500])

    send()


def fuzz(server: ApiServer, schema: schemathesis.BaseSchema, headers: dict[str, str] | None) -> Counter[tuple[str, int]]:
    """Send the generated requests; returns (operation, status) -> count."""
    seen: Counter[tuple[str, int]] = Counter()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {operation.label for operation in operations} == {"POST /streams", "DELETE /streams/{camera_id}", "GET /streams", "GET /healthz"}
    for operation in operations:
        send_generated(server, operation, GenerationMode.POSITIVE, headers, seen)
        if takes_a_body(operation):
            send_generated(server, operation, GenerationMode.NEGATIVE, headers, seen)
    return seen


def assert_healthy(server: ApiServer) -> None:
    assert server.get("/healthz", None).json() == {"status": "ok"}
    listing = server.get("/streams")
    assert listing.status_code == 200 and isinstance(listing.json(), list)


def test_fuzzed_requests_with_the_token_get_2xx_or_4xx_only(api: tuple[ApiServer, schemathesis.BaseSchema]) -> None:
    server, schema = api
    # Cameras to list while the fuzzing goes on (random URLs almost never pass the URL policy, so it adds none).
    for camera_id in PRESENT:
        assert server.post({"camera_id": camera_id, "url": f"rtsp://10.0.0.5:554/{camera_id}?token=secret"}).status_code == 201
    seen = fuzz(server, schema, AUTH)
    log.warning("with the token: %d requests, %s", sum(seen.values()), dict(sorted(seen.items())))
    assert all(200 <= status < 500 for _operation, status in seen)
    assert seen[("POST /streams", 422)] >= 1 and seen[("DELETE /streams/{camera_id}", 404)] >= 1, seen
    assert_healthy(server)
    assert {stream["camera_id"] for stream in server.get("/streams").json()} >= set(PRESENT)
    assert [server.delete(f"/streams/{camera_id}").status_code for camera_id in PRESENT] == [204] * len(PRESENT)


def test_fuzzed_requests_without_the_token_get_401_but_the_probe(api: tuple[ApiServer, schemathesis.BaseSchema]) -> None:
    server, schema = api
    seen = fuzz(server, schema, None)
    log.warning("without the token: %d requests, %s", sum(seen.values()), dict(sorted(seen.items())))
    assert {status for (operation, status) in seen if operation != "GET /healthz"} == {401}
    assert {status for (operation, status) in seen if operation == "GET /healthz"} == {200}
    assert server.get("/streams").json() == []  # nothing got in
    assert_healthy(server)
