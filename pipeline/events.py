"""Expression events: the record, its Redis stream encoding, emission policy, publisher and readers.

One stream per camera, ``<prefix>:events:<camera_id>``, capped with ``XADD MAXLEN ~`` so Redis
memory stays bounded without exact (expensive) trimming. Each entry is a flat map of strings
(``ExpressionEvent.to_fields``) so any Redis client can read it without a ferstream import;
``box`` and ``probabilities`` are compact JSON because streams have no nested values.

Delivery is at-least-once: the publisher never raises into the pipeline when Redis is
unreachable, it buffers a bounded number of events in memory and a background thread
delivers them, in order, when Redis comes back. A write that failed half-way can be
retried whole, so a consumer may (rarely) see an event twice; ``(camera_id, frame_index,
track_id)`` identifies an event for de-duplication.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import operator
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import islice
from pathlib import Path
from typing import Any, Literal, NamedTuple, TextIO

import jsonschema
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from pipeline.backoff import Backoff
from pipeline.config import BackoffConfig, EventsConfig
from pipeline.metrics import PipelineMetrics

log = logging.getLogger("ferstream.events")

SCHEMA_VERSION = 1
SCHEMA_RESOURCE = "schemas/event.schema.json"

# Events written per pipelined round-trip while draining the outage buffer: large enough to
# catch up quickly, small enough that one round-trip stays well inside socket_timeout_s.
DRAIN_BATCH_EVENTS = 500

# Errors that mean "Redis is not taking writes right now"; everything redis-py raises is a
# RedisError, and OSError covers a socket failure that escapes its wrapping.
RETRYABLE_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, OSError)


# -- the record ---------------------------------------------------------------------------------


class EventDecodeError(ValueError):
    """A stream entry is not a valid version-1 event; ``field`` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"event field {field!r}: {message}")
        self.field = field


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExpressionEvent:
    """One tracked face in one processed frame.

    Values are normalised on construction (numpy scalars become Python ``int``/``float``,
    ``box`` a tuple), because upstream stages hand over numpy values and their ``repr``
    would leak into the stream encoding.
    """

    schema_version: int = SCHEMA_VERSION
    camera_id: str
    frame_index: int
    pts_s: float
    capture_time: float  # unix seconds, when the frame was decoded
    publish_time: float = 0.0  # unix seconds; 0.0 until the publisher stamps it at write time
    track_id: int
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 in full-frame pixels
    detector_score: float
    emotion: str
    confidence: float
    # Left out of the hash (a dict is unhashable); equal events still hash equal.
    probabilities: dict[str, float] = dataclasses.field(hash=False)
    model_id: str

    def __post_init__(self) -> None:
        for name in ("schema_version", "frame_index", "track_id"):
            object.__setattr__(self, name, _as_int(name, getattr(self, name)))
        for name in ("pts_s", "capture_time", "publish_time", "detector_score", "confidence"):
            object.__setattr__(self, name, _as_float(name, getattr(self, name)))
        box = tuple(_as_int("box", value) for value in self.box)
        if len(box) != 4:
            raise EventDecodeError("box", f"expected 4 values (x1, y1, x2, y2), got {len(box)}")
        object.__setattr__(self, "box", box)
        # A private copy: the dataclass is frozen, so nobody should be able to mutate it via
        # the dict the caller still holds.
        object.__setattr__(self, "probabilities", {str(name): _as_float("probabilities", p) for name, p in self.probabilities.items()})

    def with_publish_time(self, publish_time: float) -> ExpressionEvent:
        return dataclasses.replace(self, publish_time=publish_time)

    def to_json_dict(self) -> dict[str, Any]:
        """The decoded event object described by ``schemas/event.schema.json``."""
        data = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        data["box"] = list(self.box)
        data["probabilities"] = dict(self.probabilities)
        return data

    def to_fields(self) -> dict[str, str]:
        """Flat stream fields: scalars as strings (floats via ``repr``, which round-trips
        exactly), ``box`` and ``probabilities`` as compact JSON."""
        fields: dict[str, str] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "box":
                fields["box"] = json.dumps(list(value), separators=(",", ":"))
            elif field.name == "probabilities":
                fields["probabilities"] = json.dumps(value, separators=(",", ":"))
            else:
                fields[field.name] = repr(value) if isinstance(value, float) else str(value)
        return fields

    @classmethod
    def from_fields(cls, fields: Mapping[bytes | str, bytes | str]) -> ExpressionEvent:
        """Decode a stream entry; raises ``EventDecodeError`` (a ``ValueError``) naming the bad field.

        Unknown extra fields are ignored, so a reader keeps working when a producer adds an
        optional field without bumping the schema version.
        """
        text: dict[str, str] = {}
        for raw_key, raw_value in fields.items():
            key = _decode_text("<field name>", raw_key)
            text[key] = _decode_text(key, raw_value)

        def get(name: str) -> str:
            try:
                return text[name]
            except KeyError:
                raise EventDecodeError(name, "missing") from None

        version = _parse_int("schema_version", get("schema_version"))
        if version != SCHEMA_VERSION:
            raise EventDecodeError("schema_version", f"unsupported version {version} (this reader understands {SCHEMA_VERSION})")
        return cls(
            schema_version=version,
            camera_id=_parse_nonempty("camera_id", get("camera_id")),
            frame_index=_parse_int("frame_index", get("frame_index")),
            pts_s=_parse_float("pts_s", get("pts_s")),
            capture_time=_parse_float("capture_time", get("capture_time")),
            publish_time=_parse_float("publish_time", get("publish_time")),
            track_id=_parse_int("track_id", get("track_id")),
            box=_parse_box(get("box")),
            detector_score=_parse_float("detector_score", get("detector_score")),
            emotion=_parse_nonempty("emotion", get("emotion")),
            confidence=_parse_float("confidence", get("confidence")),
            probabilities=_parse_probabilities(get("probabilities")),
            model_id=_parse_nonempty("model_id", get("model_id")),
        )


def _as_int(name: str, value: Any) -> int:
    # operator.index accepts int and numpy integers but refuses floats, so a float box or
    # frame index from an upstream bug fails loudly instead of being silently truncated.
    if isinstance(value, bool):
        raise EventDecodeError(name, f"expected an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise EventDecodeError(name, f"expected an integer, got {value!r}") from None


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, (bool, str, bytes)):
        raise EventDecodeError(name, f"expected a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise EventDecodeError(name, f"expected a number, got {value!r}") from None
    if not math.isfinite(number):
        # NaN/inf cannot be written as standard JSON, so they would break every consumer.
        raise EventDecodeError(name, f"expected a finite number, got {value!r}")
    return number


def _decode_text(name: str, value: bytes | str) -> str:
    if isinstance(value, str):
        return value
    try:
        return bytes(value).decode("utf-8")
    except (UnicodeDecodeError, TypeError):
        raise EventDecodeError(name, f"not UTF-8 text: {value!r:.80}") from None


def _parse_int(name: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise EventDecodeError(name, f"expected an integer, got {text!r:.80}") from None


def _parse_float(name: str, text: str) -> float:
    try:
        number = float(text)
    except ValueError:
        raise EventDecodeError(name, f"expected a number, got {text!r:.80}") from None
    return _as_float(name, number)


def _parse_nonempty(name: str, text: str) -> str:
    if not text:
        raise EventDecodeError(name, "empty")
    return text


def _parse_json(name: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise EventDecodeError(name, f"not valid JSON ({error.msg}): {text!r:.80}") from None


def _parse_box(text: str) -> tuple[int, int, int, int]:
    value = _parse_json("box", text)
    if not isinstance(value, list) or len(value) != 4 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise EventDecodeError("box", f"expected a JSON list of 4 integers, got {text!r:.80}")
    return (value[0], value[1], value[2], value[3])


def _parse_probabilities(text: str) -> dict[str, float]:
    value = _parse_json("probabilities", text)
    if not isinstance(value, dict) or not value:
        raise EventDecodeError("probabilities", f"expected a non-empty JSON object, got {text!r:.80}")
    return {name: _as_float("probabilities", p) for name, p in value.items()}


# -- schema -------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def event_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the decoded event, loaded from package data."""
    # Relative to this file rather than importlib.resources.files("pipeline"): under pytest's
    # default import mode a tests/pipeline folder can shadow the package name, and the schema
    # ships next to this module (package data) in every install layout we support.
    text = (Path(__file__).resolve().parent / SCHEMA_RESOURCE).read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


@functools.lru_cache(maxsize=1)
def _validator() -> jsonschema.protocols.Validator:
    schema = event_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


class EventValidationError(ValueError):
    """An event object does not match the schema; ``path`` is the dotted field path."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"event {path}: {message}")
        self.path = path


def validate_event_dict(data: Mapping[str, Any]) -> None:
    """Validate a decoded event object (``to_json_dict`` form) against the version-1 schema.

    Raises ``EventValidationError`` (a ``ValueError``) for the most relevant problem.
    """
    error = jsonschema.exceptions.best_match(_validator().iter_errors(data))
    if error is not None:
        path = ".".join(str(part) for part in error.absolute_path) or "<root>"
        raise EventValidationError(path, error.message)
    # One cross-field rule JSON Schema cannot express.
    if data["emotion"] not in data["probabilities"]:
        raise EventValidationError("emotion", f"{data['emotion']!r} is not one of the probabilities' classes")


def stream_key(prefix: str, camera_id: str) -> str:
    """The Redis stream of one camera's events."""
    return f"{prefix}:events:{camera_id}"


# -- emission policy ----------------------------------------------------------------------------


@dataclasses.dataclass
class _TrackState:
    emotion: str
    emitted_at: float
    seen_at: float


class EmissionPolicy:
    """Which processed faces become events.

    ``every_face``: all of them. ``on_change``: a track is emitted when it is new, when its
    top emotion differs from the last one emitted, and otherwise at most every
    ``heartbeat_s`` so consumers can tell "unchanged" from "gone".

    ``on_change`` keeps one small record per live track. Callers drop ended tracks with
    ``forget``/``forget_camera``; as a safety net, a track not seen for ``idle_expiry_s``
    is dropped too (it is simply treated as new if it comes back), so memory stays bounded
    even if an end is never reported.
    """

    def __init__(
        self, mode: Literal["every_face", "on_change"] = "every_face", heartbeat_s: float = 5.0, idle_expiry_s: float | None = None
    ) -> None:
        if mode not in ("every_face", "on_change"):
            raise ValueError(f"unknown emission policy {mode!r}; use 'every_face' or 'on_change'")
        if heartbeat_s <= 0:
            raise ValueError("heartbeat_s must be > 0")
        self.mode = mode
        self.heartbeat_s = heartbeat_s
        self.idle_expiry_s = idle_expiry_s if idle_expiry_s is not None else max(60.0, 10 * heartbeat_s)
        self._tracks: dict[str, dict[int, _TrackState]] = {}
        # publish() may be called from several camera threads.
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: EventsConfig) -> EmissionPolicy:
        return cls(config.policy, config.heartbeat_s)

    def select(self, camera_id: str, events: list[ExpressionEvent], now: float) -> list[ExpressionEvent]:
        """The events of one frame that should be emitted; ``now`` is any monotonic-ish clock in seconds."""
        if self.mode == "every_face":
            return list(events)
        selected = []
        with self._lock:
            tracks = self._tracks.setdefault(camera_id, {})
            for event in events:
                state = tracks.get(event.track_id)
                if state is None:
                    tracks[event.track_id] = _TrackState(event.emotion, now, now)
                    selected.append(event)
                    continue
                state.seen_at = now
                if event.emotion != state.emotion or now - state.emitted_at >= self.heartbeat_s:
                    state.emotion, state.emitted_at = event.emotion, now
                    selected.append(event)
            stale = [track_id for track_id, state in tracks.items() if now - state.seen_at > self.idle_expiry_s]
            for track_id in stale:
                del tracks[track_id]
        return selected

    def forget(self, camera_id: str, track_id: int) -> None:
        with self._lock:
            tracks = self._tracks.get(camera_id)
            if tracks is not None:
                tracks.pop(track_id, None)
                if not tracks:
                    del self._tracks[camera_id]

    def forget_camera(self, camera_id: str) -> None:
        with self._lock:
            self._tracks.pop(camera_id, None)

    def tracked(self, camera_id: str | None = None) -> int:
        """How many tracks the policy holds state for (one camera, or all)."""
        with self._lock:
            if camera_id is not None:
                return len(self._tracks.get(camera_id, {}))
            return sum(len(tracks) for tracks in self._tracks.values())


# -- publisher ----------------------------------------------------------------------------------


class _Pending(NamedTuple):
    camera_id: str
    key: str
    event: ExpressionEvent


def redis_client(url: str, socket_timeout_s: float, password: str | None = None) -> redis.Redis:
    """A client that fails fast: bounded connect/read timeouts and no hidden redis-py retries
    (their backoff would block the calling frame; the publisher retries on its own terms).
    ``password`` (from a Secret, via the environment) wins over one in the URL."""
    extra = {"password": password} if password else {}
    return redis.Redis.from_url(
        url, socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s, retry=Retry(NoBackoff(), 0), **extra
    )


class EventPublisher:
    """Writes a camera's events for one frame with one pipelined round-trip.

    While Redis is unreachable the events go to a bounded FIFO buffer (the oldest are dropped
    when it is full) and a background flusher thread retries with exponential backoff. The
    thread, rather than retry-on-next-publish, is what delivers the backlog: a camera that
    went quiet (or a pipeline that stopped) would otherwise leave its last events stuck in
    memory, and a retry inside ``publish`` could block a frame for ``socket_timeout_s`` on
    every attempt. While anything is buffered, new events are appended behind it, so each
    camera's events reach Redis in order; only the first write that fails costs the frame
    a round-trip (bounded by ``socket_timeout_s``).
    """

    def __init__(
        self,
        config: EventsConfig,
        metrics: PipelineMetrics,
        client: redis.Redis | None = None,
        *,
        policy: EmissionPolicy | None = None,
        wall_clock: Callable[[], float] = time.time,
        policy_clock: Callable[[], float] = time.monotonic,
        drain_batch: int = DRAIN_BATCH_EVENTS,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.policy = policy if policy is not None else EmissionPolicy.from_config(config)
        self._owns_client = client is None
        self.client = client if client is not None else redis_client(config.redis_url, config.socket_timeout_s, config.password_value)
        self._wall_clock = wall_clock
        self._policy_clock = policy_clock
        self._drain_batch = max(1, drain_batch)

        # _cond guards everything below it; Redis is never called while holding it.
        self._cond = threading.Condition(threading.Lock())
        self._buffer: deque[_Pending] = deque()
        self._in_flight: list[_Pending] = []  # taken from the buffer by the flusher, write pending
        self._degraded = False  # True from a failed write until the backlog is fully delivered
        self._closed = False
        self._overflow_logged = False  # one warning per outage, not one per dropped event
        self._flusher: threading.Thread | None = None
        self._wake = threading.Event()  # cuts a backoff sleep short (flush(), close())

    # -- public API -----------------------------------------------------------------------------
    def publish(self, camera_id: str, events: list[ExpressionEvent]) -> list[ExpressionEvent]:
        """Emit one processed frame's events (after the emission policy); never raises for Redis trouble.

        Returns the events selected for emission, stamped with ``publish_time``, whether they
        were written now or buffered for later.
        """
        started = time.perf_counter()
        try:
            selected = self.policy.select(camera_id, events, self._policy_clock())
            if not selected:
                return []
            key = stream_key(self.config.stream_prefix, camera_id)
            now = self._wall_clock()
            stamped = [event.with_publish_time(now) for event in selected]
            batch = [_Pending(camera_id, key, event) for event in stamped]
            with self._cond:
                if self._closed:
                    log.warning("camera %s: publish after close; %d events dropped", camera_id, len(batch))
                    self.metrics.events_dropped.labels(camera=camera_id, reason="closed").inc(len(batch))
                    return stamped
                write_now = not self._degraded
                if not write_now:
                    self._enqueue_locked(batch)
            if write_now:
                try:
                    self._write(batch)
                except RETRYABLE_ERRORS as error:
                    self.metrics.redis_errors.inc()
                    log.warning("Redis write failed (%s: %s); buffering events until it is back", type(error).__name__, error)
                    with self._cond:
                        self._degraded = True
                        self._enqueue_locked(batch)
                    self._ensure_flusher()
                else:
                    self._delivered(batch)
            return stamped
        finally:
            self.metrics.stage_latency.labels(stage="publish").observe(time.perf_counter() - started)

    @property
    def buffered(self) -> int:
        """Events held in memory, including a batch the flusher is writing right now."""
        with self._cond:
            return len(self._buffer) + len(self._in_flight)

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Try to deliver the buffer now and wait up to ``timeout_s``; True when it is empty."""
        deadline = time.monotonic() + timeout_s
        self._wake.set()  # skip the rest of the current backoff sleep
        with self._cond:
            while self._degraded and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            return not self._buffer and not self._in_flight

    def close(self, timeout_s: float = 5.0) -> None:
        """Deliver what can be delivered within ``timeout_s``, then stop; what is left is
        counted in ``events_dropped{reason="closed"}``. Idempotent."""
        with self._cond:
            if self._closed:
                return
        self.flush(timeout_s)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._wake.set()
        if self._flusher is not None:
            # A write in progress finishes within the socket timeout.
            self._flusher.join(timeout=self.config.socket_timeout_s + 1.0)
        with self._cond:
            lost = list(self._in_flight) + list(self._buffer)
            self._buffer.clear()
            self._in_flight.clear()
            self._degraded = False
            self._set_buffer_gauge_locked()
        for item in lost:
            self.metrics.events_dropped.labels(camera=item.camera_id, reason="closed").inc()
        if lost:
            log.error("closed with %d events still undelivered; they are lost", len(lost))
        if self._owns_client:
            self.client.close()

    # -- internals ------------------------------------------------------------------------------
    def _write(self, batch: Sequence[_Pending]) -> None:
        # One round-trip for the whole batch; no MULTI because atomicity buys nothing here and
        # would hold the server for the whole batch.
        pipe = self.client.pipeline(transaction=False)
        for item in batch:
            pipe.xadd(item.key, item.event.to_fields(), maxlen=self.config.maxlen, approximate=True)
        pipe.execute()

    def _delivered(self, batch: Sequence[_Pending]) -> None:
        for item in batch:
            self.metrics.events_published.labels(camera=item.camera_id).inc()
            self.metrics.end_to_end_latency.labels(camera=item.camera_id).observe(
                max(0.0, item.event.publish_time - item.event.capture_time)
            )

    def _enqueue_locked(self, batch: Sequence[_Pending]) -> None:
        self._buffer.extend(batch)
        self._trim_locked()
        self._set_buffer_gauge_locked()
        self._cond.notify_all()

    def _trim_locked(self) -> None:
        # The batch in flight is not counted against the bound: it is older than everything
        # in the buffer, and whether it is lost is only known when its write returns. If the
        # write fails it goes back to the front and is trimmed first, so the survivors are
        # always the newest buffer_max_events.
        overflow = len(self._buffer) - self.config.buffer_max_events
        if overflow <= 0:
            return
        for _ in range(overflow):
            item = self._buffer.popleft()
            self.metrics.events_dropped.labels(camera=item.camera_id, reason="buffer_full").inc()
        if not self._overflow_logged:
            self._overflow_logged = True
            log.warning("event buffer full (%d events): dropping the oldest until Redis is back", self.config.buffer_max_events)

    def _set_buffer_gauge_locked(self) -> None:
        self.metrics.events_buffered.set(len(self._buffer) + len(self._in_flight))

    def _ensure_flusher(self) -> None:
        with self._cond:
            if self._closed or (self._flusher is not None and self._flusher.is_alive()):
                return
            self._flusher = threading.Thread(target=self._flush_loop, name="ferstream-events-flusher", daemon=True)
            self._flusher.start()

    def _flush_loop(self) -> None:
        backoff = Backoff(self.config.retry)
        while True:
            with self._cond:
                while not self._degraded and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
            # Wait before retrying: the write that put us here has only just failed.
            if self._wake.wait(backoff.next_delay()):
                self._wake.clear()
            outcome = "more"
            while outcome == "more":
                outcome = self._drain_step()
            if outcome == "done":
                backoff.reset()

    def _drain_step(self) -> Literal["more", "done", "failed", "closed"]:
        """Write the oldest batch of the buffer once."""
        with self._cond:
            if self._closed:
                return "closed"
            if not self._buffer:
                return self._recovered_locked()
            self._in_flight = list(islice(self._buffer, self._drain_batch))
            for _ in self._in_flight:
                self._buffer.popleft()
            # Re-stamp: publish_time is when the event actually reached Redis, so the
            # end-to-end latency includes the outage.
            now = self._wall_clock()
            batch = [item._replace(event=item.event.with_publish_time(now)) for item in self._in_flight]
        try:
            self._write(batch)
        except Exception as error:  # anything: the flusher thread must survive to deliver the rest
            if isinstance(error, RETRYABLE_ERRORS):
                self.metrics.redis_errors.inc()
                log.debug("Redis still unreachable (%s: %s); %d events buffered", type(error).__name__, error, self.buffered)
            else:
                log.exception("unexpected error writing buffered events; will retry")
            with self._cond:
                self._buffer.extendleft(reversed(self._in_flight))
                self._in_flight = []
                self._trim_locked()
                self._set_buffer_gauge_locked()
            return "failed"
        self._delivered(batch)
        with self._cond:
            self._in_flight = []
            self._set_buffer_gauge_locked()
            if not self._buffer:
                return self._recovered_locked()
        return "more"

    def _recovered_locked(self) -> Literal["done"]:
        # Only here, with the buffer empty under the lock, may publish() write directly again;
        # any event enqueued before this point has already been delivered, so order holds.
        if self._degraded:
            log.info("Redis reachable again; event backlog delivered")
        self._degraded = False
        self._overflow_logged = False
        self._cond.notify_all()
        return "done"


# -- consumers ----------------------------------------------------------------------------------


class StreamMessage(NamedTuple):
    stream: str
    message_id: str
    event: ExpressionEvent


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _stream_entries(response: Any) -> list[tuple[str, list[tuple[Any, Any]]]]:
    """XREAD/XREADGROUP reply as ``[(stream, [(id, fields), ...]), ...]`` for RESP2 (list)
    and RESP3 (dict) clients alike."""
    if not response:
        return []
    resp3 = isinstance(response, dict)
    result = []
    for stream, entries in response.items() if resp3 else response:
        # RESP3 replies wrap each stream's entry list in one more list.
        if resp3 and entries and isinstance(entries[0], list):
            entries = entries[0]
        result.append((_text(stream), [(entry[0], entry[1]) for entry in entries]))
    return result


class EventSubscriber:
    """Reads camera streams through a consumer group, so several consumers can share the work
    and a restarted consumer loses nothing.

    A new subscriber first re-reads its own pending entries (delivered before but never
    acked: id ``0``), then new ones (``>``). Ack each message with ``ack`` once it is
    handled. ``start_id`` only matters when the group is created: ``$`` new events only,
    ``0`` the whole retained stream.
    """

    def __init__(
        self,
        client_or_url: redis.Redis | str,
        prefix: str,
        camera_ids: str | Iterable[str],
        group: str,
        consumer: str,
        *,
        start_id: str = "$",
        block_ms: int = 1000,
        count: int = 100,
        socket_timeout_s: float = 5.0,
    ) -> None:
        cameras = [camera_ids] if isinstance(camera_ids, str) else list(camera_ids)
        if not cameras:
            raise ValueError("subscribe to at least one camera")
        self.prefix = prefix
        self.group = group
        self.consumer = consumer
        self.start_id = start_id
        self.block_ms = block_ms
        self.count = count
        self.streams = [stream_key(prefix, camera) for camera in cameras]
        self._owns_client = isinstance(client_or_url, str)
        # The read timeout must outlast BLOCK, or every idle wait would end as a TimeoutError.
        if isinstance(client_or_url, str):
            self.client = redis_client(client_or_url, socket_timeout_s + block_ms / 1000)
        else:
            self.client = client_or_url
        self._cursor = dict.fromkeys(self.streams, "0")  # "0": replaying own pending; ">": new
        self._groups_ready = False

    def ensure_groups(self, start_id: str | None = None) -> None:
        """XGROUP CREATE ... MKSTREAM on every stream; an existing group is left as it is."""
        for stream in self.streams:
            try:
                self.client.xgroup_create(stream, self.group, id=start_id or self.start_id, mkstream=True)
            except redis.ResponseError as error:
                if "BUSYGROUP" not in str(error):
                    raise
        self._groups_ready = True

    def read(self, block_ms: int | None = None, count: int | None = None) -> list[StreamMessage]:
        """One batch: own pending entries while there are any, otherwise new entries (waiting
        up to ``block_ms``). Empty when nothing arrived in time."""
        if not self._groups_ready:
            self.ensure_groups()
        try:
            return self._read(self.block_ms if block_ms is None else block_ms, count or self.count)
        except redis.ResponseError as error:
            if "NOGROUP" not in str(error):
                raise
            # The group vanished (Redis restarted without persistence, or it was deleted):
            # recreate it from the start of what the stream now holds, so events written
            # since are not skipped.
            log.warning("consumer group %s missing; recreating it", self.group)
            self.ensure_groups(start_id="0")
            self._cursor = dict.fromkeys(self.streams, "0")
            return self._read(self.block_ms if block_ms is None else block_ms, count or self.count)

    def _read(self, block_ms: int, count: int) -> list[StreamMessage]:
        while any(cursor != ">" for cursor in self._cursor.values()):
            replay = {stream: cursor for stream, cursor in self._cursor.items() if cursor != ">"}
            reply = _stream_entries(self.client.xreadgroup(self.group, self.consumer, replay, count=count))
            got = dict(reply)
            for stream in replay:
                entries = got.get(stream, [])
                # An empty page means this consumer's pending list for the stream is done.
                self._cursor[stream] = _text(entries[-1][0]) if entries else ">"
            messages = self._decode(reply)
            if messages:
                return messages
        reply = _stream_entries(
            self.client.xreadgroup(self.group, self.consumer, dict.fromkeys(self.streams, ">"), count=count, block=block_ms)
        )
        return self._decode(reply)

    def _decode(self, reply: list[tuple[str, list[tuple[Any, Any]]]]) -> list[StreamMessage]:
        messages = []
        for stream, entries in reply:
            for raw_id, fields in entries:
                message_id = _text(raw_id)
                if not fields:
                    # Pending but trimmed away by MAXLEN before it was acked: nothing to redeliver.
                    log.warning("%s %s: pending entry no longer in the stream; acking it", stream, message_id)
                    self.ack(stream, message_id)
                    continue
                try:
                    event = ExpressionEvent.from_fields(fields)
                except ValueError as error:
                    # Ack a malformed entry so it is not redelivered forever after each restart.
                    log.error("%s %s: not a valid event, skipped and acked: %s", stream, message_id, error)
                    self.ack(stream, message_id)
                    continue
                messages.append(StreamMessage(stream, message_id, event))
        return messages

    def listen(self, stop: threading.Event | None = None, retry: BackoffConfig | None = None) -> Iterator[StreamMessage]:
        """Yield messages until ``stop`` is set; reconnects with backoff when Redis goes away."""
        backoff = Backoff(retry or BackoffConfig(initial_s=0.2, max_s=5.0))
        while stop is None or not stop.is_set():
            try:
                messages = self.read()
            except (redis.ConnectionError, redis.TimeoutError) as error:
                delay = backoff.next_delay()
                log.warning("reading events failed (%s); retrying in %.1fs", error, delay)
                # Replay own pending entries again after a reconnect: a reply lost in transit
                # leaves its entries pending for us.
                self._cursor = dict.fromkeys(self.streams, "0")
                if stop is not None:
                    stop.wait(delay)
                else:
                    time.sleep(delay)
                continue
            backoff.reset()
            yield from messages

    def __iter__(self) -> Iterator[StreamMessage]:
        return self.listen()

    def ack(self, stream: str, *message_ids: str) -> int:
        """XACK: the messages are handled and will not be redelivered. Returns how many were pending."""
        if not message_ids:
            return 0
        return int(self.client.xack(stream, self.group, *message_ids))

    def close(self) -> None:
        if self._owns_client:
            self.client.close()


def tail(
    redis_url: str,
    prefix: str,
    camera_id: str,
    from_start: bool = False,
    count: int | None = None,
    out: TextIO = sys.stdout,
    *,
    block_ms: int = 1000,
    client: redis.Redis | None = None,
) -> int:
    """Print one camera's events as JSON lines as they arrive (plain XREAD, no group, no acks).

    ``from_start``: the retained history first; ``count``: stop after that many events
    (None: until interrupted). Returns how many events were printed.
    """
    key = stream_key(prefix, camera_id)
    owns_client = client is None
    conn = client if client is not None else redis_client(redis_url, 5.0 + block_ms / 1000)
    try:
        if from_start:
            last_id = "0-0"
        else:
            # Resolve "$" to a concrete id once: re-sending "$" on each XREAD would skip
            # whatever arrives between two calls.
            newest = conn.xrevrange(key, count=1)
            last_id = _text(newest[0][0]) if newest else "0-0"
        printed = 0
        while count is None or printed < count:
            want = 100 if count is None else min(100, count - printed)
            for _stream, entries in _stream_entries(conn.xread({key: last_id}, count=want, block=block_ms)):
                for raw_id, fields in entries:
                    last_id = _text(raw_id)
                    try:
                        event = ExpressionEvent.from_fields(fields)
                    except ValueError as error:
                        log.warning("%s %s: not a valid event, skipped: %s", key, last_id, error)
                        continue
                    out.write(json.dumps(event.to_json_dict(), separators=(",", ":")) + "\n")
                    printed += 1
            out.flush()
        return printed
    finally:
        if owns_client:
            conn.close()
