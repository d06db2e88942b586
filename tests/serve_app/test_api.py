"""The Controller's HTTP API (serve_app/api.py) served by uvicorn on a loopback port, against a real
redis-server, without Ray: bearer auth, the API's URL policy (each bypass from issue 11 is a 422
naming ``url``), max_cameras, non-finite numbers, and bodies that never repeat a credential."""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import requests
import uvicorn
from fastapi import APIRouter, FastAPI
from pydantic import ValidationError

from pipeline.auth import ApiAuth, ApiTokens
from pipeline.config import ConfigError, EventsConfig, SourceConfig, UrlPolicyConfig
from pipeline.registry import CameraRegistry
from serve_app.api import MAX_BODY_BYTES, StreamController, StreamRequest, build_api
from serve_app.live_routes import live_hold_s
from tests.conftest import RedisServer, free_port

pytestmark = pytest.mark.integration

TOKEN = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"
WRONG = "ffffffffffffffffffffffffffffffff"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SECRET_URL = "rtsp://admin:hunter2@10.0.0.5:554/live?channel=1&token=s3cr3tvalue"
SECRETS = ("hunter2", "s3cr3tvalue")


class ApiServer:
    def __init__(self, app: FastAPI) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ApiServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    def post(self, body: dict[str, Any], headers: dict[str, str] | None = AUTH) -> requests.Response:
        return requests.post(f"{self.url}/streams", json=body, headers=headers, timeout=10)

    def post_raw(self, body: str, headers: dict[str, str] | None = AUTH) -> requests.Response:
        return requests.post(f"{self.url}/streams", data=body, headers={"Content-Type": "application/json", **(headers or {})}, timeout=10)

    def get(self, path: str, headers: dict[str, str] | None = AUTH) -> requests.Response:
        return requests.get(f"{self.url}{path}", headers=headers, timeout=10)

    def delete(self, path: str, headers: dict[str, str] | None = AUTH) -> requests.Response:
        return requests.delete(f"{self.url}{path}", headers=headers, timeout=10)


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url, socket_timeout=2)
    yield client
    client.close()


def serve(client: redis.Redis, auth: ApiAuth, url_policy: UrlPolicyConfig | None = None, max_cameras: int = 8) -> ApiServer:
    controller = StreamController(CameraRegistry(client, "test"), url_policy or UrlPolicyConfig(), max_cameras, "per_camera")
    return ApiServer(build_api(controller, auth))


@pytest.fixture
def api(client: redis.Redis) -> Iterator[ApiServer]:
    with serve(client, ApiAuth(ApiTokens([TOKEN]), required=True)) as server:
        yield server


# -- authentication ---------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [None, {"Authorization": f"Bearer {WRONG}"}, {"Authorization": f"Basic {TOKEN}"}, {"X-Token": TOKEN}])
def test_every_route_but_healthz_needs_the_token(api: ApiServer, headers: dict[str, str] | None) -> None:
    responses = [
        api.get("/streams", headers),
        api.post({"camera_id": "lobby", "url": "rtsp://cam/s"}, headers),
        api.delete("/streams/lobby", headers),
        api.get("/openapi.json", headers),
        api.get("/no-such-path", headers),  # unknown paths are not told apart from known ones
        api.post_raw("{not json", headers),  # refused before the body is read
    ]
    for response in responses:
        assert response.status_code == 401, (response.request.method, response.request.url, response.text)
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert api.get("/streams", AUTH).json() == []  # nothing was added


def test_a_wrong_token_is_told_apart_from_a_missing_one(api: ApiServer) -> None:
    missing = api.get("/streams", None)
    wrong = api.get("/streams", {"Authorization": f"Bearer {WRONG}"})
    assert missing.headers["WWW-Authenticate"] == 'Bearer realm="ferstream"' and "missing bearer token" in missing.json()["detail"]
    assert 'error="invalid_token"' in wrong.headers["WWW-Authenticate"] and wrong.json() == {"detail": "invalid bearer token"}
    assert TOKEN not in missing.text + wrong.text and WRONG not in wrong.text


def test_the_token_opens_every_route(api: ApiServer) -> None:
    assert api.post({"camera_id": "lobby", "url": "rtsp://cam/s"}).status_code == 201
    assert [stream["camera_id"] for stream in api.get("/streams").json()] == ["lobby"]
    assert api.get("/openapi.json").status_code == 200
    assert api.delete("/streams/lobby").status_code == 204
    assert api.delete("/streams/lobby").status_code == 404


def test_healthz_is_open_and_says_nothing_about_redis_but_whether_it_answers(api: ApiServer, redis_server: RedisServer) -> None:
    assert api.get("/healthz", None).json() == {"status": "ok"}
    redis_server.stop()
    down = api.get("/healthz", None)
    assert down.status_code == 503 and down.json() == {"detail": "redis unreachable"}
    registry_down = api.post({"camera_id": "lobby", "url": "rtsp://cam/s"})
    assert registry_down.status_code == 503 and "unreachable" in registry_down.json()["detail"]


def test_any_of_several_tokens_is_accepted(client: redis.Redis, tmp_path: Path) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text(f"# ops\n{WRONG}\n")
    with serve(client, ApiAuth(ApiTokens([TOKEN], token_file), required=True)) as api:
        assert api.get("/streams", {"Authorization": f"Bearer {WRONG}"}).status_code == 200
        assert api.get("/streams", AUTH).status_code == 200
        token_file.write_text("# the ops token was revoked\n")
        assert api.get("/streams", {"Authorization": f"Bearer {WRONG}"}).status_code == 401
        assert api.get("/streams", AUTH).status_code == 200


def test_added_routers_are_behind_the_token_unless_their_path_is_open(client: redis.Redis) -> None:
    router = APIRouter()

    @router.get("/page")
    def page() -> dict[str, str]:
        return {"page": "open"}

    @router.get("/data")
    def data() -> dict[str, str]:
        return {"data": "private"}

    @router.get("/static/{name}")
    def asset(name: str) -> dict[str, str]:
        return {"asset": name}

    controller = StreamController(CameraRegistry(client, "test"), UrlPolicyConfig(), 8, "per_camera")
    auth = ApiAuth(ApiTokens([TOKEN]), required=True)
    app = build_api(controller, auth, open_paths=frozenset({"/healthz", "/page"}), routers=[router], open_prefixes=frozenset({"/static/"}))
    with ApiServer(app) as api:
        assert api.get("/page", None).json() == {"page": "open"}
        assert api.get("/static/app.js", None).json() == {"asset": "app.js"}
        assert api.get("/data", None).status_code == 401
        assert api.get("/data").json() == {"data": "private"}
        assert api.get("/streams", None).status_code == 401
        for sneaky in ("/static/../streams", "/static/%2e%2e/streams", "/static/./x", "/page/"):
            # http.client sends the path as written (requests would resolve the dot segments first).
            connection = http.client.HTTPConnection("127.0.0.1", api.port, timeout=10)
            connection.request("GET", sneaky)
            assert connection.getresponse().status == 401, sneaky
            connection.close()


def test_an_open_prefix_must_be_a_directory() -> None:
    from serve_app.api import BearerAuthMiddleware

    for prefix in ("/", "/static"):
        with pytest.raises(ValueError, match="open prefixes end with '/'"):
            BearerAuthMiddleware(FastAPI(), ApiAuth(ApiTokens(), required=False), open_prefixes=frozenset({prefix}))


def test_an_open_api_needs_no_header(client: redis.Redis) -> None:
    with serve(client, ApiAuth(ApiTokens(), required=False)) as api:
        assert api.post({"camera_id": "lobby", "url": "rtsp://cam/s"}, None).status_code == 201
        assert api.get("/streams", None).status_code == 200


# -- the URL policy of the API -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "tcp:10.0.0.5:6379",
        "pipe:3",
        "concat:/etc/hosts|/etc/passwd",
        "ftp:host/x",
        "file:///proc/self/environ",
        "http://169.254.169.254/",
        "http://[fe80::1]/x",
        "rtsp://metadata.google.internal/x",
        "rtsp://[bad/x",
        "ftp://host/video",
        "/etc/passwd",  # a bare path: the API takes explicit URLs only
        "clip.mp4",
        "file:///etc/passwd",  # no allowed_file_dirs: no files at all
        "rtsp://cam/" + "a" * 3000,
    ],
)
def test_the_issues_bypasses_are_422_naming_url(api: ApiServer, url: str) -> None:
    response = api.post({"camera_id": "x", "url": url})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert "url" in str(detail), detail
    assert api.get("/streams").json() == []


def test_file_sources_only_inside_allowed_file_dirs(client: redis.Redis, tmp_path: Path) -> None:
    allowed = tmp_path / "videos"
    allowed.mkdir()
    (allowed / "clip.mp4").write_bytes(b"")
    (tmp_path / "other.mp4").write_bytes(b"")
    (allowed / "escape.mp4").symlink_to(tmp_path / "other.mp4")
    with serve(client, ApiAuth(ApiTokens([TOKEN]), required=True), UrlPolicyConfig(allowed_file_dirs=(allowed,))) as api:
        assert api.post({"camera_id": "ok", "url": f"file://{allowed}/clip.mp4"}).status_code == 201
        for url in (
            f"file://{tmp_path}/other.mp4",
            f"file://{allowed}/../other.mp4",
            f"file://{allowed}/escape.mp4",
            str(allowed / "clip.mp4"),
        ):
            response = api.post({"camera_id": "bad", "url": url})
            assert response.status_code == 422 and response.json()["detail"].startswith("stream: url: "), (url, response.text)


def test_link_local_cameras_when_the_operator_allows_them(client: redis.Redis) -> None:
    with serve(client, ApiAuth(ApiTokens([TOKEN]), required=True), UrlPolicyConfig(allow_link_local=True)) as api:
        assert api.post({"camera_id": "ll", "url": "rtsp://169.254.10.20/stream"}).status_code == 201


# -- max_cameras --------------------------------------------------------------------------------------


def test_a_full_app_refuses_new_cameras_with_409(client: redis.Redis) -> None:
    with serve(client, ApiAuth(ApiTokens([TOKEN]), required=True), max_cameras=2) as api:
        assert api.post({"camera_id": "a", "url": "rtsp://cam/a"}).status_code == 201
        assert api.post({"camera_id": "b", "url": "rtsp://cam/b"}).status_code == 201
        full = api.post({"camera_id": "c", "url": "rtsp://cam/c"})
        assert full.status_code == 409 and "max_cameras=2" in full.json()["detail"]
        assert api.post({"camera_id": "a", "url": "rtsp://cam/a"}).json() == {"detail": "stream 'a' already exists"}
        assert api.delete("/streams/a").status_code == 204
        assert api.post({"camera_id": "c", "url": "rtsp://cam/c"}).status_code == 201


# -- the names of 0.1 ----------------------------------------------------------------------------------


def test_the_old_names_id_and_fps_are_still_accepted(api: ApiServer) -> None:
    assert api.post({"id": "door", "url": "rtsp://cam/s", "fps": 2}).json() == {"camera_id": "door", "url": "rtsp://cam/s"}
    (stream,) = api.get("/streams").json()
    assert (stream["camera_id"], stream["target_fps"]) == ("door", 2)
    assert "id" not in stream and "fps_target" not in stream  # responses speak the config's names only


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"id": "a", "camera_id": "a", "url": "rtsp://cam/s"}, "camera_id"),
        ({"camera_id": "a", "url": "rtsp://cam/s", "fps": 2, "target_fps": 2}, "target_fps"),
    ],
)
def test_a_field_under_both_its_names_is_422_naming_it(api: ApiServer, body: dict[str, Any], field: str) -> None:
    response = api.post(body)
    assert response.status_code == 422, response.text
    (problem,) = response.json()["detail"]
    assert problem["msg"].startswith(f"Value error, {field} and ") and "both given" in problem["msg"]
    assert api.get("/streams").json() == []


# -- non-finite numbers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ('{"camera_id": "x", "url": "rtsp://cam/s", "target_fps": Infinity}', "target_fps"),
        ('{"camera_id": "x", "url": "rtsp://cam/s", "target_fps": NaN}', "target_fps"),
        ('{"camera_id": "x", "url": "rtsp://cam/s", "target_fps": -Infinity}', "target_fps"),
        ('{"camera_id": "x", "url": "rtsp://cam/s", "options": {"open_timeout_s": Infinity}}', "open_timeout_s"),
        ('{"camera_id": "x", "url": "rtsp://cam/s", "options": {"reconnect": {"initial_s": NaN}}}', "reconnect.initial_s"),
        ('{"camera_id": "x", "url": "rtsp://cam/s", "options": {"max_reconnects": Infinity}}', "max_reconnects"),
    ],
)
def test_non_finite_numbers_are_422_naming_the_field_and_leave_no_phantom_camera(api: ApiServer, body: str, field: str) -> None:
    response = api.post_raw(body)
    assert response.status_code == 422, response.text
    assert field in str(response.json()["detail"])
    assert api.get("/streams").json() == []
    assert api.post({"camera_id": "x", "url": "rtsp://cam/s"}).status_code == 201  # the id is free


# -- no credentials in responses ------------------------------------------------------------------------


def assert_no_secret(response: requests.Response) -> None:
    for secret in SECRETS:
        assert secret not in response.text, response.text


def test_post_and_get_show_the_url_redacted(api: ApiServer) -> None:
    created = api.post({"camera_id": "door", "url": SECRET_URL})
    assert created.status_code == 201
    assert created.json() == {"camera_id": "door", "url": "rtsp://admin:***@10.0.0.5:554/live?channel=1&token=***"}
    listed = api.get("/streams")
    assert listed.json()[0]["url"] == "rtsp://admin:***@10.0.0.5:554/live?channel=1&token=***"
    for response in (created, listed, api.get("/openapi.json")):
        assert_no_secret(response)


@pytest.mark.parametrize(
    "body",
    [
        {"url": SECRET_URL},  # no id: FastAPI's default error would quote the whole body
        {"camera_id": "x", "url": SECRET_URL, "target_fps": "fast"},
        {"camera_id": "x", "url": SECRET_URL, "bogus": 1},
        {"camera_id": "has space", "url": SECRET_URL},
        {"camera_id": "x", "url": SECRET_URL, "options": {"url": SECRET_URL}},
        {"camera_id": "x", "url": SECRET_URL, "options": {"reconnect": SECRET_URL}},
        {"camera_id": "x", "url": SECRET_URL + "/" + "a" * 3000},
        {"camera_id": "x", "url": "rtsp://user:hunter2/s3cr3tvalue@host/x"},  # urllib takes "hunter2/..." for a port
        {"camera_id": "x", "url": SECRET_URL.replace("10.0.0.5", "169.254.169.254")},
        {"camera_id": "x", "url": [SECRET_URL]},
    ],
)
def test_error_bodies_never_repeat_a_credential(api: ApiServer, body: dict[str, Any]) -> None:
    response = api.post(body)
    assert response.status_code == 422, response.text
    assert_no_secret(response)


def test_last_error_in_get_streams_is_scrubbed(api: ApiServer, client: redis.Redis) -> None:
    assert api.post({"camera_id": "door", "url": SECRET_URL}).status_code == 201
    registry = CameraRegistry(client, "test")
    registry.put_statuses([{"camera_id": "door", "state": "reconnecting", "last_error": f"open: 401 for {SECRET_URL} (hunter2)"}], 60)
    (stream,) = api.get("/streams").json()
    assert stream["state"] == "reconnecting" and stream["last_error"].startswith("open: 401 for rtsp://admin:***@10.0.0.5")
    assert "hunter2" not in stream["last_error"] and "s3cr3tvalue" not in stream["last_error"]


def test_a_body_too_large_is_refused_before_it_is_read(api: ApiServer) -> None:
    response = api.post({"camera_id": "x", "url": "rtsp://cam/" + "a" * MAX_BODY_BYTES})
    assert response.status_code == 413
    assert api.get("/streams").json() == []


def test_stream_request_maps_to_a_source_config() -> None:
    request = StreamRequest(
        camera_id="lobby",
        url="rtsp://cam/stream",
        target_fps=2.5,
        transport="udp",
        loop=True,
        options={"watchdog_timeout_s": 3, "reconnect": {"initial_s": 0.2, "max_s": 1}},
    )
    camera = request.to_source_config()
    assert (camera.camera_id, camera.url, camera.target_fps, camera.transport, camera.loop) == (
        "lobby",
        "rtsp://cam/stream",
        2.5,
        "udp",
        True,
    )
    assert camera.watchdog_timeout_s == 3 and camera.reconnect.initial_s == 0.2 and camera.reconnect.max_s == 1


def test_stream_request_defaults_are_source_configs() -> None:
    camera = StreamRequest(camera_id="lobby", url="rtsp://cam/stream").to_source_config()
    assert camera == SourceConfig(camera_id="lobby", url="rtsp://cam/stream")
    # The API's documented default rate (README: 5 frames a second) is SourceConfig's.
    assert camera.target_fps == 5.0 and (camera.transport, camera.loop) == ("tcp", False)
    assert StreamRequest(camera_id="all", url="rtsp://cam/stream", target_fps=None).to_source_config().target_fps is None


def test_stream_request_top_level_fields_are_source_config_fields() -> None:
    top_level = set(StreamRequest.model_fields) - {"options"}
    for name in top_level:
        request_field, source_field = StreamRequest.model_fields[name], SourceConfig.model_fields[name]
        assert request_field.annotation == source_field.annotation, name
        assert request_field.get_default() == source_field.get_default(), name
        assert request_field.metadata == source_field.metadata, name


def test_stream_request_accepts_the_old_names_for_one_release() -> None:
    camera = StreamRequest.model_validate({"id": "lobby", "url": "rtsp://cam/stream", "fps": 2}).to_source_config()
    assert (camera.camera_id, camera.target_fps) == ("lobby", 2)


@pytest.mark.parametrize("body", [{"id": "a", "camera_id": "a"}, {"camera_id": "a", "fps": 1, "target_fps": 1}])
def test_stream_request_refuses_a_field_under_both_names(body: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="both given"):
        StreamRequest.model_validate({"url": "rtsp://cam/stream", **body})


def test_the_preview_is_off_unless_a_stream_asks_for_it() -> None:
    assert StreamRequest(camera_id="lobby", url="rtsp://cam/stream").to_source_config().preview is False
    assert StreamRequest(camera_id="lobby", url="rtsp://cam/stream", options={"preview": True}).to_source_config().preview is True


def test_one_event_speaks_for_a_frame_interval_or_for_a_heartbeat_on_the_live_page() -> None:
    assert live_hold_s(EventsConfig()) == 1.0
    assert live_hold_s(EventsConfig(policy="on_change", heartbeat_s=5.0)) == 6.0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"target_fps": -1}, "target_fps"),
        ({"fps": 0}, "fps"),  # the error names the field as it was sent
        ({"transport": "sctp"}, "transport"),
        ({"camera_id": "has space"}, "camera_id"),
    ],
)
def test_a_bad_top_level_field_is_refused_by_the_request_model(body: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as raised:
        StreamRequest.model_validate({"camera_id": "lobby", "url": "rtsp://cam/stream", **body})
    assert [problem["loc"] for problem in raised.value.errors()] == [(field,)]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"url": "ftp://host/video"}, "url"),
        ({"options": {"nonsense": 1}}, "nonsense"),
        ({"options": {"reconnect": {"initial_s": -1}}}, "reconnect.initial_s"),
    ],
)
def test_a_bad_stream_request_names_the_field(body: dict[str, Any], field: str) -> None:
    request = StreamRequest.model_validate({"camera_id": "lobby", "url": "rtsp://cam/stream", **body})
    with pytest.raises(ConfigError) as raised:
        request.to_source_config()
    assert f"stream: {field}:" in str(raised.value)


def test_stream_request_rejects_unknown_top_level_fields() -> None:
    with pytest.raises(ValidationError):
        StreamRequest.model_validate({"camera_id": "lobby", "url": "rtsp://cam/stream", "max_fps": 2})


# -- batching user_config -------------------------------------------------------------------------


def test_stream_request_options_cannot_override_the_top_level_fields() -> None:
    request = StreamRequest(camera_id="door", url="rtsp://cam/1", options={"url": "rtsp://other/2", "loop": True})
    with pytest.raises(ConfigError, match="loop, url must be given as the top-level field"):
        request.to_source_config()
