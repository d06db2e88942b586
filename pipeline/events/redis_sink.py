"""The Redis Streams sink: one stream per camera, ``<prefix>:events:<camera_id>``.

Streams are capped with ``XADD MAXLEN ~`` so Redis memory stays bounded without exact
(expensive) trimming. A batch is one pipelined round-trip. ``redis_client`` and ``stream_key``
are shared with the readers (``pipeline.events.readers``) and the camera registry.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from pipeline.config import EventsConfig
from pipeline.events.record import ExpressionEvent
from pipeline.events.sink import EventSink, EventSinkUnavailable

# Errors that mean "Redis is not taking writes right now"; everything redis-py raises is a
# RedisError, and OSError covers a socket failure that escapes its wrapping.
RETRYABLE_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, OSError)


def stream_key(prefix: str, camera_id: str) -> str:
    """The Redis stream of one camera's events."""
    return f"{prefix}:events:{camera_id}"


def redis_client(url: str, socket_timeout_s: float, password: str | None = None) -> redis.Redis:
    """A client that fails fast: bounded connect/read timeouts and no hidden redis-py retries
    (their backoff would block the calling frame; the publisher retries on its own terms).
    ``password`` (from a Secret, via the environment) wins over one in the URL."""
    extra = {"password": password} if password else {}
    return redis.Redis.from_url(
        url, socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s, retry=Retry(NoBackoff(), 0), **extra
    )


class RedisStreamSink(EventSink):
    """``XADD`` each event to its camera's stream, the whole batch in one pipelined round-trip.

    Without a ``client`` it makes one from ``config`` (fail-fast timeouts, see ``redis_client``)
    and closes it on ``close``; a client it is given stays the caller's.
    """

    name = "Redis"

    def __init__(self, config: EventsConfig, client: redis.Redis | None = None) -> None:
        self.prefix = config.stream_prefix
        self.maxlen = config.maxlen
        self._owns_client = client is None
        self.client = client if client is not None else redis_client(config.redis_url, config.socket_timeout_s, config.password_value)

    def write(self, events: Sequence[ExpressionEvent]) -> None:
        # No MULTI: atomicity buys nothing here and would hold the server for the whole batch.
        pipe = self.client.pipeline(transaction=False)
        for event in events:
            pipe.xadd(stream_key(self.prefix, event.camera_id), event.to_fields(), maxlen=self.maxlen, approximate=True)
        try:
            pipe.execute()
        except RETRYABLE_ERRORS as error:
            raise EventSinkUnavailable(f"{type(error).__name__}: {error}") from error

    def close(self) -> None:
        if self._owns_client:
            self.client.close()
