"""Reading events back from Redis Streams: ``EventSubscriber`` (consumer groups) and ``tail`` (plain XREAD)."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple, TextIO

import redis

from pipeline.backoff import Backoff
from pipeline.config import BackoffConfig
from pipeline.events.record import ExpressionEvent
from pipeline.events.redis_sink import redis_client, stream_key

log = logging.getLogger("ferstream.events")


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
