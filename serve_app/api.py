"""The Controller's HTTP API: add, remove and list cameras, and a health probe.

``build_api`` returns the FastAPI app; the Controller deployment builds it in its replica
(``__serve_build_asgi_app__``), with the tokens that replica read from its own environment, so
no token passes through Ray's application arguments. Nothing here imports Ray: the tests run the
same app under uvicorn.

Every route but ``GET /healthz`` needs ``Authorization: Bearer <token>`` when tokens are
configured (pipeline/auth.py); the check runs before the body is read, and an unknown path gets
the same 401 as a known one. Bodies are validated with non-finite numbers refused, and no
response or error body repeats a submitted value: URLs are shown redacted, validation errors
carry the field and the reason only.

No ``from __future__ import annotations`` here: FastAPI reads the endpoint annotations at run time.
"""

import asyncio
import logging
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import redis
from fastapi import APIRouter, FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from pipeline.auth import WWW_AUTHENTICATE, ApiAuth
from pipeline.config import ConfigError, PreviewMode, SourceConfig, UrlPolicyConfig, parse_config, refuse_preview
from pipeline.registry import AddOutcome, CameraRegistry
from pipeline.url_policy import UrlOrigin, UrlRefused, redact_url, scrub_credentials

log = logging.getLogger("ferstream.api")

# Paths any client may call: the probe of Kubernetes and load balancers.
OPEN_PATHS = frozenset({"/healthz"})
# A camera is a few hundred bytes of JSON; a request far above that is refused before it is read.
MAX_BODY_BYTES = 64 * 1024


# The API's names in ferstream 0.1, before it took the config's: accepted for one more release (CHANGELOG.md).
OLD_FIELD_NAMES = {"camera_id": "id", "target_fps": "fps"}


# Each top-level field is SourceConfig's (default, bounds, description): pydantic merges the
# FieldInfos of an Annotated field, so nothing is restated here.
SOURCE_FIELDS = SourceConfig.model_fields


def also_accepts_old_name(name: str) -> Any:
    return Field(validation_alias=AliasChoices(name, OLD_FIELD_NAMES[name]))


class StreamRequest(BaseModel):
    """``POST /streams``: a camera, in ``SourceConfig``'s names and with its defaults. ``options``
    takes any other per-camera setting. ``id`` and ``fps`` (the names of 0.1) are accepted for
    ``camera_id`` and ``target_fps`` for one release; both names at once are a 422."""

    # allow_inf_nan=False: Python's JSON parser reads Infinity and NaN, which are no setting.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    # The types must be SourceConfig's too (tests/serve_app/test_app.py checks).
    camera_id: Annotated[str, SOURCE_FIELDS["camera_id"], also_accepts_old_name("camera_id")]
    url: Annotated[str, SOURCE_FIELDS["url"]]
    target_fps: Annotated[float | None, SOURCE_FIELDS["target_fps"], also_accepts_old_name("target_fps")]
    transport: Annotated[Literal["tcp", "udp"], SOURCE_FIELDS["transport"]]
    loop: Annotated[bool, SOURCE_FIELDS["loop"]]
    options: dict[str, Any] = Field(default_factory=dict, description="any other SourceConfig field, e.g. open_timeout_s")

    @model_validator(mode="before")
    @classmethod
    def _one_name_per_field(cls, data: Any) -> Any:
        # Without this, the second name would be refused as an unknown field, which reads as a typo.
        if isinstance(data, dict):
            for name, old_name in OLD_FIELD_NAMES.items():
                if name in data and old_name in data:
                    raise ValueError(f"{name} and {old_name} (its old name) both given: send {name} only")
        return data

    def to_source_config(self) -> SourceConfig:
        fields = self.model_dump(exclude={"options"})
        clashes = sorted(set(self.options) & set(fields))
        if clashes:
            raise ConfigError(f"stream: options: {', '.join(clashes)} must be given as the top-level field, not in options")
        return parse_config(SourceConfig, {**self.options, **fields}, "stream")


class ApiError(Exception):
    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


class StreamController:
    """What the routes do, against the camera registry in Redis."""

    def __init__(self, registry: CameraRegistry, url_policy: UrlPolicyConfig, max_cameras: int, previews: PreviewMode) -> None:
        self.registry = registry
        self.url_policy = url_policy
        self.max_cameras = max_cameras
        self.previews = previews

    def add(self, request: StreamRequest) -> dict[str, Any]:
        try:
            camera = request.to_source_config()
            # The API's own rules on top of the URL's shape: no bare paths, files only under
            # url_policy.allowed_file_dirs, no link-local or metadata hosts unless allowed.
            self.url_policy.check(camera.url, UrlOrigin.API)
        except UrlRefused as refusal:
            raise ApiError(422, f"stream: url: {refusal}") from None
        except ConfigError as error:
            raise ApiError(422, scrub_credentials(str(error), request.url)) from None
        refusal = refuse_preview(self.previews, camera)
        if refusal is not None:
            raise ApiError(422, f"stream: options.preview: {refusal}")
        outcome = self.registry.add_within(camera, self.max_cameras)
        if outcome is AddOutcome.EXISTS:
            raise ApiError(409, f"stream {camera.camera_id!r} already exists")
        if outcome is AddOutcome.FULL:
            raise ApiError(
                409, f"the app runs at most max_cameras={self.max_cameras} cameras: remove one (DELETE /streams/<id>) or raise max_cameras"
            )
        log.info("camera %s added (%s)", camera.camera_id, redact_url(camera.url))
        return {"camera_id": camera.camera_id, "url": redact_url(camera.url)}

    def remove(self, camera_id: str) -> None:
        if not self.registry.remove(camera_id):
            raise ApiError(404, f"no stream {camera_id!r}")
        log.info("camera %s removed", camera_id)

    def streams(self) -> list[dict[str, Any]]:
        cameras = self.registry.cameras()
        statuses = self.registry.statuses(cameras)
        streams = []
        for camera_id, camera in sorted(cameras.items()):
            status = statuses.get(camera_id, {})
            last_error = status.get("last_error")
            streams.append(
                {
                    "camera_id": camera_id,
                    "url": redact_url(camera.url),
                    "target_fps": camera.target_fps,
                    "transport": camera.transport,
                    "state": status.get("state", "pending"),
                    "measured_fps": status.get("measured_fps", 0.0),
                    "last_frame_time": status.get("last_frame_time"),
                    "reconnects": status.get("reconnects", 0),
                    "frames_decoded": status.get("frames_decoded", 0),
                    "frames_dropped": status.get("frames_dropped", 0),
                    # Written by the decode thread from library messages: a library may have quoted the URL.
                    "last_error": scrub_credentials(str(last_error), camera.url) if last_error is not None else None,
                    "owner": status.get("owner"),
                }
            )
        return streams

    def healthy(self) -> bool:
        try:
            return bool(self.registry.client.ping())
        except redis.RedisError:
            return False


def route_path(scope: Scope) -> str:
    """The path below the app's mount point (Serve's route_prefix)."""
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root) :]
    return path or "/"


class BearerAuthMiddleware:
    """Refuses every request without an accepted bearer token (401), but those to ``open_paths``
    or below one of ``open_prefixes`` (``/static/``), and bodies declared larger than
    ``max_body_bytes`` (413), before the app reads anything."""

    def __init__(
        self,
        app: ASGIApp,
        auth: ApiAuth,
        open_paths: frozenset[str] = OPEN_PATHS,
        open_prefixes: frozenset[str] = frozenset(),
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        if any(not prefix.endswith("/") or prefix == "/" for prefix in open_prefixes):
            raise ValueError("open prefixes end with '/' and are not '/' itself (that would open every path)")
        self.app = app
        self.auth = auth
        self.open_paths = open_paths
        self.open_prefixes = tuple(open_prefixes)
        self.max_body_bytes = max_body_bytes

    def is_open(self, path: str) -> bool:
        # Dot segments would let "/static/../streams" pass as a static path: such paths are never open.
        if "/." in path or "%" in path:
            return False
        return path in self.open_paths or path.startswith(self.open_prefixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":  # no websockets here: nothing to authenticate them with
            await send({"type": "websocket.close", "code": 1008})
            return
        headers = Headers(scope=scope)
        if not self.is_open(route_path(scope)) and not self.auth.allows(headers.get("authorization")):
            presented = headers.get("authorization") is not None
            challenge = f'{WWW_AUTHENTICATE}, error="invalid_token"' if presented else WWW_AUTHENTICATE
            detail = "invalid bearer token" if presented else "missing bearer token: send Authorization: Bearer <token>"
            await JSONResponse({"detail": detail}, status_code=401, headers={"WWW-Authenticate": challenge})(scope, receive, send)
            return
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            await JSONResponse({"detail": f"request body larger than {self.max_body_bytes} bytes"}, status_code=413)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _validation_problem(problem: dict[str, Any]) -> dict[str, Any]:
    # FastAPI's default body adds "input" (the submitted value: a URL with its password, a 50 MB
    # string) and "ctx"; the field and the reason are enough to fix a request.
    return {"loc": list(problem.get("loc", ())), "msg": problem.get("msg", ""), "type": problem.get("type", "")}


def build_api(
    controller: StreamController,
    auth: ApiAuth,
    open_paths: frozenset[str] = OPEN_PATHS,
    routers: Sequence[APIRouter] = (),
    open_prefixes: frozenset[str] = frozenset(),
) -> FastAPI:
    """The app. ``routers``: more routes (a page, its data), behind the same token check unless
    their paths are in ``open_paths`` or below one of ``open_prefixes``."""
    api = FastAPI(title="ferstream", description="Add, remove and inspect cameras; events go to Redis Streams.")
    api.add_middleware(BearerAuthMiddleware, auth=auth, open_paths=open_paths, open_prefixes=open_prefixes)
    for router in routers:
        api.include_router(router)

    @api.exception_handler(RequestValidationError)
    async def validation_failed(_request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": [_validation_problem(problem) for problem in error.errors()]}, status_code=422)

    @api.exception_handler(ApiError)
    async def api_error(_request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse({"detail": error.detail}, status_code=error.status_code)

    @api.exception_handler(redis.RedisError)
    async def registry_unreachable(_request: Request, error: redis.RedisError) -> JSONResponse:
        log.warning("API: the camera registry is unreachable: %s", type(error).__name__)
        return JSONResponse({"detail": "the camera registry (Redis) is unreachable; try again"}, status_code=503)

    @api.post("/streams", status_code=201)
    def add_stream(request: StreamRequest) -> dict[str, Any]:
        return controller.add(request)

    @api.delete("/streams/{camera_id}", status_code=204)
    def remove_stream(camera_id: str) -> Response:
        controller.remove(camera_id)
        return Response(status_code=204)

    @api.get("/streams")
    def list_streams() -> list[dict[str, Any]]:
        return controller.streams()

    @api.get("/healthz")
    async def healthz() -> dict[str, str]:
        # Open to any client: it says whether Redis answers, not where it is.
        if not await asyncio.to_thread(controller.healthy):
            raise HTTPException(status_code=503, detail="redis unreachable")
        return {"status": "ok"}

    return api
