"""The JSON-lines sink: each event as one line of its decoded JSON form, to a file or standard output.

Meant for a single machine, a demo, or a log shipper that tails a file; the line format is the
one ``ferstream tail`` prints and ``schemas/event.schema.json`` describes.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from pipeline.config import ConfigError, EventsConfig, JsonlSinkConfig
from pipeline.events.record import ExpressionEvent
from pipeline.events.sink import EventSink, EventSinkUnavailable

STDOUT_PATH = "-"


class JsonLinesSink(EventSink):
    """Appends events to ``out``, one JSON object a line, flushed after each batch.

    Without ``out`` it opens ``path`` for appending (``-``: standard output), so an unwritable
    path fails at start, not at the first event; a stream it is given stays the caller's.
    """

    name = "JSON-lines sink"

    def __init__(self, path: str = STDOUT_PATH, out: TextIO | None = None) -> None:
        self.path = path
        self._owns_out = out is None and path != STDOUT_PATH
        if out is not None:
            self._out = out
        elif path == STDOUT_PATH:
            self._out = sys.stdout
        else:
            try:
                self._out = Path(path).expanduser().open("a", encoding="utf-8")
            except OSError as error:
                raise ConfigError(f"events.sink.path: cannot open {path!r} for appending: {error.strerror}") from None
        # Cameras publish from their own threads; one batch's lines must not interleave with another's.
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: EventsConfig) -> JsonLinesSink:
        sink = config.sink
        if not isinstance(sink, JsonlSinkConfig):
            raise TypeError(f"events.sink.kind is {sink.kind!r}, not 'jsonl'")
        return cls(sink.path)

    def write(self, events: Sequence[ExpressionEvent]) -> None:
        text = "".join(json.dumps(event.to_json_dict(), separators=(",", ":")) + "\n" for event in events)
        with self._lock:
            try:
                self._out.write(text)
                self._out.flush()
            except OSError as error:  # disk full, a closed pipe: the publisher buffers and retries
                raise EventSinkUnavailable(f"{type(error).__name__}: {error}") from error

    def close(self) -> None:
        if self._owns_out:
            self._out.close()
