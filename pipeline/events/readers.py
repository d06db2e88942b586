"""Reading events back from Redis Streams: ``EventSubscriber`` (consumer groups, claiming of dead
consumers' entries, counting of entries lost to trimming) and ``tail`` (plain XREAD)."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple, TextIO

import redis

from pipeline.backoff import Backoff
from pipeline.config import BackoffConfig
from pipeline.events.record import ExpressionEvent
from pipeline.events.redis_sink import redis_client, stream_key
from pipeline.log_limits import RepeatLimitedLog
from pipeline.metrics import SubscriberMetrics

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


# Entries trimmed (XADD MAXLEN ~) before the group read them: count them and resynchronise the group's
# entries-read, atomically, so that each loss is counted once whichever consumer of the group checks.
# Redis >= 7 keeps ``entries-added`` per stream and ``entries-read`` per group: the entries before the
# first one still in the stream number entries-added - length, and those the group never read among
# them are that minus entries-read. Redis does not correct entries-read when it skips a trimmed gap
# (it goes on counting from the old value), hence the XGROUP SETID ... ENTRIESREAD after a count.
# Reply: {lost, how}: how 0 nothing trimmed unread, 1 counted, 2 trimmed past the group but the
# server keeps no counters to count with (Redis < 7: ids compared only), 3 counted and
# entries-read was unknown (lost is -1).
TRIM_CHECK_LUA = """
local function field(reply, name)
  for i = 1, #reply, 2 do
    if reply[i] == name then return reply[i + 1] end
  end
  return nil
end
local function older(a, b)
  local ams, aseq = string.match(a, '^(%d+)-(%d+)$')
  local bms, bseq = string.match(b, '^(%d+)-(%d+)$')
  ams, aseq, bms, bseq = tonumber(ams), tonumber(aseq), tonumber(bms), tonumber(bseq)
  return ams < bms or (ams == bms and aseq < bseq)
end
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, 0} end
local stream = redis.call('XINFO', 'STREAM', KEYS[1])
local first = field(stream, 'first-entry')
if not first then return {0, 0} end
local group = nil
for _, candidate in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  if field(candidate, 'name') == ARGV[1] then group = candidate end
end
if not group then return {0, 0} end
local last = field(group, 'last-delivered-id')
if not older(last, first[1]) then return {0, 0} end
local added = field(stream, 'entries-added')
if not added then return {0, 2} end
local before = added - field(stream, 'length')
if before <= 0 then return {0, 0} end
local read = field(group, 'entries-read')
if not read then
  redis.call('XGROUP', 'SETID', KEYS[1], ARGV[1], last, 'ENTRIESREAD', before)
  return {-1, 3}
end
local lost = before - read
if lost <= 0 then return {0, 0} end
redis.call('XGROUP', 'SETID', KEYS[1], ARGV[1], last, 'ENTRIESREAD', before)
return {lost, 1}
"""


class EventSubscriber:
    """Reads camera streams through a consumer group, so several consumers can share the work
    and a restarted consumer loses nothing.

    A new subscriber first re-reads its own pending entries (delivered before but never
    acked: id ``0``), then new ones (``>``). Ack each message with ``ack`` once it is
    handled. ``start_id`` only matters when the group is created: ``$`` new events only,
    ``0`` the whole retained stream.

    Consumer names: pending entries belong to a consumer *name*, and a restarted consumer gets
    its own back only under the same name. Give each consumer a name that survives its restarts
    and is unique in the group: a StatefulSet pod's name (``analytics-0``), or a fixed name per
    host or worker slot; never one that changes with every pod or process (a random suffix, a
    Deployment pod's generated name). The entries of a name that never comes back are found by
    ``XAUTOCLAIM``: every ``maintenance_interval_s`` this subscriber claims entries that have
    been pending on any consumer of the group for more than ``claim_idle_ms`` (``None``: never)
    and delivers them as its own. ``claim_idle_ms`` must be longer than a consumer takes to
    handle and ack a message, or a slow but live consumer's entries are delivered twice.

    Trimming: ``XADD MAXLEN`` drops the oldest entries whether the group read them or not. The
    same maintenance counts entries trimmed before the group read them
    (``events_lost_to_trim{state="unread"}``, from ``XINFO`` ``entries-added``/``entries-read``,
    Redis >= 7) and pending entries trimmed before they were acked (``state="pending"``), in
    ``metrics`` (a ``SubscriberMetrics``; by default on a private registry, ``self.metrics.registry``).
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
        claim_idle_ms: int | None = 60_000,
        maintenance_interval_s: float = 5.0,
        metrics: SubscriberMetrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        cameras = [camera_ids] if isinstance(camera_ids, str) else list(camera_ids)
        if not cameras:
            raise ValueError("subscribe to at least one camera")
        if claim_idle_ms is not None and claim_idle_ms < 1:
            raise ValueError(f"claim_idle_ms must be >= 1 ms or None, got {claim_idle_ms}")
        if maintenance_interval_s < 0:
            raise ValueError(f"maintenance_interval_s must be >= 0, got {maintenance_interval_s}")
        self.prefix = prefix
        self.group = group
        self.consumer = consumer
        self.start_id = start_id
        self.block_ms = block_ms
        self.count = count
        self.claim_idle_ms = claim_idle_ms
        self.maintenance_interval_s = maintenance_interval_s
        self.metrics = metrics if metrics is not None else SubscriberMetrics()
        self.streams = [stream_key(prefix, camera) for camera in cameras]
        self._camera_of = {stream_key(prefix, camera): camera for camera in cameras}
        self._owns_client = isinstance(client_or_url, str)
        # The read timeout must outlast BLOCK, or every idle wait would end as a TimeoutError.
        if isinstance(client_or_url, str):
            self.client = redis_client(client_or_url, socket_timeout_s + block_ms / 1000)
        else:
            self.client = client_or_url
        self._cursor = dict.fromkeys(self.streams, "0")  # "0": replaying own pending; ">": new
        self._claim_cursor = dict.fromkeys(self.streams, "0-0")  # where the next XAUTOCLAIM pass goes on
        self._groups_ready = False
        self._clock = clock
        self._next_maintenance = clock()  # at once: a restarted consumer claims what a dead one left
        self._trim_check = self.client.register_script(TRIM_CHECK_LUA)
        self._log = RepeatLimitedLog(log)

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
        """One batch: own pending entries while there are any, then (when maintenance is due)
        entries claimed from consumers that left them idle, otherwise new entries (waiting up to
        ``block_ms``). Empty when nothing arrived in time."""
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
        if self._clock() >= self._next_maintenance:
            claimed = self._maintain(count)
            if claimed:
                return claimed
        reply = _stream_entries(
            self.client.xreadgroup(self.group, self.consumer, dict.fromkeys(self.streams, ">"), count=count, block=block_ms)
        )
        return self._decode(reply)

    # -- maintenance: dead consumers' entries and trimming -------------------------------------
    def _maintain(self, count: int) -> list[StreamMessage]:
        """Count what trimming took from the group, then claim idle entries (up to ``count``)."""
        for stream in self.streams:
            self._count_trimmed_unread(stream)
        claimed = self.claim_idle(count) if self.claim_idle_ms is not None else []
        if len(claimed) >= count or any(cursor != "0-0" for cursor in self._claim_cursor.values()):
            self._next_maintenance = self._clock()  # maybe more to claim: go on at the next read
        else:
            self._next_maintenance = self._clock() + self.maintenance_interval_s
        return claimed

    def claim_idle(self, count: int | None = None, min_idle_ms: int | None = None) -> list[StreamMessage]:
        """XAUTOCLAIM: take over entries pending longer than ``min_idle_ms`` (default ``claim_idle_ms``)
        on any consumer of the group, up to ``count``, and return them as this consumer's messages."""
        idle_ms = min_idle_ms if min_idle_ms is not None else self.claim_idle_ms
        if idle_ms is None:
            raise ValueError("claim_idle needs min_idle_ms when the subscriber has claim_idle_ms=None")
        want = count or self.count
        messages: list[StreamMessage] = []
        for stream in self.streams:
            if len(messages) >= want:
                break
            cursor = self._claim_cursor[stream]
            reply = self.client.xautoclaim(stream, self.group, self.consumer, idle_ms, start_id=cursor, count=want - len(messages))
            next_cursor, entries = _text(reply[0]), reply[1] or []
            # Redis >= 7 removes pending ids whose entries were trimmed and lists them third.
            deleted = reply[2] if len(reply) > 2 else []
            self._claim_cursor[stream] = next_cursor
            if deleted:
                self._lost_pending(stream, len(deleted))
            present = [(raw_id, fields) for raw_id, fields in entries if fields]
            if len(present) < len(entries):  # Redis 6.2 returns trimmed entries with no fields instead
                self._lost_pending(stream, len(entries) - len(present))
                self.ack(stream, *(_text(raw_id) for raw_id, fields in entries if not fields))
            claimed = self._decode([(stream, present)])
            if present:
                self.metrics.events_claimed.labels(camera=self._camera_of[stream], group=self.group).inc(len(present))
                log.info("%s: claimed %d entries idle > %d ms for consumer %s", stream, len(present), idle_ms, self.consumer)
            messages.extend(claimed)
        return messages

    def _count_trimmed_unread(self, stream: str) -> None:
        lost, how = (int(value) for value in self._trim_check(keys=[stream], args=[self.group]))
        camera = self._camera_of[stream]
        if how in (1, 3):
            if lost > 0:
                self.metrics.events_lost_to_trim.labels(camera=camera, group=self.group, state="unread").inc(lost)
            self._log.warning(
                (stream, "trimmed"),
                "%s: %s entries trimmed before group %s read them (raise events.maxlen, or add consumers)",
                stream,
                lost if lost >= 0 else "an unknown number of",
                self.group,
            )
        elif how == 2:
            self._log.warning(
                (stream, "trimmed"),
                "%s: entries may have been trimmed before group %s read them; this Redis keeps no entries-added"
                " counter to count them with (Redis >= 7 does)",
                stream,
                self.group,
            )

    def _lost_pending(self, stream: str, lost: int) -> None:
        self.metrics.events_lost_to_trim.labels(camera=self._camera_of[stream], group=self.group, state="pending").inc(lost)
        self._log.warning((stream, "pending"), "%s: %d pending entries trimmed before they were acked", stream, lost)

    def _decode(self, reply: list[tuple[str, list[tuple[Any, Any]]]]) -> list[StreamMessage]:
        messages = []
        for stream, entries in reply:
            for raw_id, fields in entries:
                message_id = _text(raw_id)
                if not fields:
                    # Pending but trimmed away by MAXLEN before it was acked: nothing to redeliver.
                    self._lost_pending(stream, 1)
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
                self._log.warning(("read", type(error).__name__), "reading events failed (%s); retrying in %.1fs", error, delay)
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
