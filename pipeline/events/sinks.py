"""Which ``EventSink`` a config names: one builder per ``events.sink.kind``."""

from __future__ import annotations

from collections.abc import Callable

from pipeline.config import EventsConfig
from pipeline.events.jsonl_sink import JsonLinesSink
from pipeline.events.redis_sink import RedisStreamSink
from pipeline.events.sink import EventSink

# A new sink module adds its kind here (and its config model to pipeline.config.EventSinkConfig).
SINK_BUILDERS: dict[str, Callable[[EventsConfig], EventSink]] = {
    "redis": RedisStreamSink,
    "jsonl": JsonLinesSink.from_config,
}


def build_sink(config: EventsConfig) -> EventSink:
    """The sink ``config.sink`` selects, built from the ``events`` settings."""
    return SINK_BUILDERS[config.sink.kind](config)
