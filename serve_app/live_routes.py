"""The live page's routes: the page and its files (open: the page asks for the token itself) and
the JSON and JPEG it polls (behind the API's token check, like every other route).

Ray-free, so the routes run under a plain ASGI server in tests; the Controller passes the router
to :func:`serve_app.api.build_api`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Response
from fastapi.responses import FileResponse

from pipeline.config import EventsConfig, PreviewMode, SourceConfig, preview_on
from pipeline.live import LiveSummaries
from pipeline.preview import PreviewStore

# Plain files, no build step, nothing from another host.
STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_TYPES = {"index.html": "text/html", "live.js": "text/javascript", "live.css": "text/css"}
# Served without a token: the page and its files, nothing else.
PAGE_PATHS = frozenset({"/"})
PAGE_PREFIXES = frozenset({"/static/"})


def live_hold_s(events: EventsConfig) -> float:
    """How long one event speaks for its track on the live page: a frame interval at 1 fps or more
    with every_face; with on_change an unchanged track is re-emitted every heartbeat_s."""
    return events.heartbeat_s + 1.0 if events.policy == "on_change" else 1.0


def live_page_router(
    live: LiveSummaries, previews: PreviewStore, cameras: Callable[[], dict[str, SourceConfig]], preview_mode: PreviewMode
) -> APIRouter:
    router = APIRouter()
    preview_off = (
        "previews are off for this app (previews: none)"
        if preview_mode == "none"
        else "preview is off for this stream (add it with options.preview: true, or set the app's previews: all)"
    )

    @router.get("/", include_in_schema=False)
    def live_page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})

    @router.get("/static/{name}", include_in_schema=False)
    def static_file(name: str) -> FileResponse:
        if name not in STATIC_TYPES:  # a fixed list: no path from the request reaches the file system
            raise HTTPException(status_code=404, detail="no such static file")
        return FileResponse(STATIC_DIR / name, media_type=STATIC_TYPES[name], headers={"Cache-Control": "no-cache"})

    def camera_of(camera_id: str) -> SourceConfig:
        camera = cameras().get(camera_id)
        if camera is None:
            raise HTTPException(status_code=404, detail="no such stream")
        return camera

    @router.get("/streams/{camera_id}/summary")
    def stream_summary(camera_id: str) -> dict[str, Any]:
        """The last minute of the camera's events: emotion mix, per-5-s face-seconds, current tracks."""
        camera = camera_of(camera_id)
        return {**live.summary(camera_id, time.time()).to_json_dict(), "preview": preview_on(preview_mode, camera)}

    @router.get("/streams/{camera_id}/preview.jpg")
    def stream_preview(camera_id: str) -> Response:
        if not preview_on(preview_mode, camera_of(camera_id)):
            raise HTTPException(status_code=403, detail=preview_off)
        jpeg = previews.get(camera_id)
        if jpeg is None:
            raise HTTPException(status_code=404, detail="no preview frame of this stream yet")
        return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "no-store"})

    return router
