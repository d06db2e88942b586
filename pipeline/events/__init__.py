"""Expression events: the record and schema, the emission policy, the publisher and its sinks, and the readers.

- ``record``: ``ExpressionEvent``, its stream-field encoding and decoding, the JSON Schema checks.
- ``policy``: ``EmissionPolicy``, which processed faces become events.
- ``publisher``: ``EventPublisher``, transport-neutral buffering, ordering and retry.
- ``sink``: the ``EventSink`` interface a transport implements; ``sinks.build_sink`` picks one from the config.
- ``redis_sink``: Redis Streams (the default); ``jsonl_sink``: JSON lines to a file or stdout.
- ``readers``: ``EventSubscriber`` (consumer groups, claiming of dead consumers' entries, trimming losses counted) and ``tail``.
"""

from pipeline.events.jsonl_sink import JsonLinesSink
from pipeline.events.policy import EmissionPolicy
from pipeline.events.publisher import DRAIN_BATCH_EVENTS, EventPublisher
from pipeline.events.readers import EventSubscriber, StreamMessage, tail
from pipeline.events.record import (
    SCHEMA_VERSION,
    UNCERTAIN,
    EventDecodeError,
    EventValidationError,
    ExpressionEvent,
    event_schema,
    new_run_id,
    validate_event_dict,
)
from pipeline.events.redis_sink import RETRYABLE_ERRORS, RedisStreamSink, redis_client, stream_key
from pipeline.events.sink import EventSink, EventSinkUnavailable
from pipeline.events.sinks import SINK_BUILDERS, build_sink

__all__ = [
    "DRAIN_BATCH_EVENTS",
    "RETRYABLE_ERRORS",
    "SCHEMA_VERSION",
    "SINK_BUILDERS",
    "UNCERTAIN",
    "EmissionPolicy",
    "EventDecodeError",
    "EventPublisher",
    "EventSink",
    "EventSinkUnavailable",
    "EventSubscriber",
    "EventValidationError",
    "ExpressionEvent",
    "JsonLinesSink",
    "RedisStreamSink",
    "StreamMessage",
    "build_sink",
    "event_schema",
    "new_run_id",
    "redis_client",
    "stream_key",
    "tail",
    "validate_event_dict",
]
