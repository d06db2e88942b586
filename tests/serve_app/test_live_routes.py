"""The live page's routes behind the API's token check, under uvicorn with a real redis-server (no Ray)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis

from pipeline.auth import ApiAuth, ApiTokens
from pipeline.config import PipelineConfig, PreviewMode, SourceConfig, UrlPolicyConfig
from pipeline.live import LiveSummaries
from pipeline.preview import PreviewStore
from pipeline.registry import CameraRegistry
from serve_app.api import OPEN_PATHS, StreamController, build_api
from serve_app.live_routes import PAGE_PATHS, PAGE_PREFIXES, live_page_router
from tests.conftest import RedisServer
from tests.serve_app.test_api import AUTH, TOKEN, ApiServer


@contextmanager
def page_with(redis_server: RedisServer, mode: PreviewMode) -> Iterator[tuple[ApiServer, CameraRegistry, PreviewStore]]:
    """The API and the page's routes as the Controller wires them, under the app's previews ``mode``."""
    client = redis.Redis.from_url(redis_server.url, socket_timeout=2)
    client.flushdb()
    registry = CameraRegistry(client, "test")
    previews = PreviewStore(client, "test")
    router = live_page_router(LiveSummaries(client, "test", hold_s=1.0), previews, registry.cameras, mode)
    auth = ApiAuth(ApiTokens([TOKEN]), required=True)
    app = build_api(
        StreamController(registry, UrlPolicyConfig(), 8, mode),
        auth,
        routers=[router],
        open_paths=OPEN_PATHS | PAGE_PATHS,
        open_prefixes=PAGE_PREFIXES,
    )
    with ApiServer(app) as server:
        yield server, registry, previews


@pytest.fixture
def page(redis_server: RedisServer) -> Iterator[tuple[ApiServer, CameraRegistry, PreviewStore]]:
    with page_with(redis_server, PipelineConfig.model_fields["previews"].default) as running:
        yield running


def test_the_page_and_its_files_are_open_and_nothing_else_is(page) -> None:
    server, registry, _previews = page
    assert server.get("/", None).status_code == 200 and "<html" in server.get("/", None).text.lower()
    assert server.get("/static/live.js", None).status_code == 200
    escape = server.get("/static/..%2Fdeployments.py", None)  # a fixed list of files, never a path
    assert escape.status_code in (401, 404) and "import" not in escape.text
    registry.add(SourceConfig(camera_id="lobby", url="rtsp://10.0.0.5/stream"))
    assert server.get("/streams/lobby/summary", None).status_code == 401
    assert server.get("/streams/lobby/preview.jpg", None).status_code == 401


def test_summary_and_preview_follow_the_cameras_setting(page) -> None:
    server, registry, previews = page
    registry.add(SourceConfig(camera_id="off", url="rtsp://10.0.0.5/a"))
    registry.add(SourceConfig(camera_id="on", url="rtsp://10.0.0.5/b", preview=True))
    assert server.get("/streams/off/summary", AUTH).json()["preview"] is False
    assert server.get("/streams/off/preview.jpg", AUTH).status_code == 403  # off by default
    assert server.get("/streams/on/preview.jpg", AUTH).status_code == 404  # on, but no frame yet
    previews.put("on", b"\xff\xd8jpeg")
    response = server.get("/streams/on/preview.jpg", AUTH)
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert server.get("/streams/missing/summary", AUTH).status_code == 404


def test_previews_all_serves_every_camera_and_none_serves_none(redis_server: RedisServer) -> None:
    with page_with(redis_server, "all") as (server, registry, previews):
        registry.add(SourceConfig(camera_id="plain", url="rtsp://10.0.0.5/a"))  # preview not asked for
        assert server.get("/streams/plain/summary", AUTH).json()["preview"] is True
        previews.put("plain", b"\xff\xd8jpeg")
        assert server.get("/streams/plain/preview.jpg", AUTH).status_code == 200
    with page_with(redis_server, "none") as (server, registry, previews):
        registry.add(SourceConfig(camera_id="old", url="rtsp://10.0.0.5/b", preview=True))  # registered before the mode changed
        previews.put("old", b"\xff\xd8jpeg")
        assert server.get("/streams/old/summary", AUTH).json()["preview"] is False
        refused = server.get("/streams/old/preview.jpg", AUTH)
        assert refused.status_code == 403 and "previews: none" in refused.json()["detail"]
        body = {"camera_id": "new", "url": "rtsp://10.0.0.5/c", "options": {"preview": True}}
        added = server.post(body)
        assert added.status_code == 422 and "options.preview" in added.json()["detail"] and "previews: none" in added.json()["detail"]
        assert "new" not in registry.cameras()
        assert server.post({**body, "options": {}}).status_code == 201  # without a preview it is welcome
