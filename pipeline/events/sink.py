"""The interface between the publisher and a transport: an ``EventSink`` writes batches of events.

The publisher (``pipeline.events.publisher``) owns everything transport-neutral: the emission
policy, ``publish_time`` stamps, the bounded outage buffer, per-camera ordering, retries with
backoff, and the metrics. A sink only writes. A new transport (Kafka, MQTT, a webhook) is a new
module in this package with one ``EventSink`` subclass, a ``kind`` in ``pipeline.config``'s
``EventSinkConfig`` and one line in ``pipeline.events.sinks.SINK_BUILDERS``.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

from pipeline.events.record import ExpressionEvent


class EventSinkUnavailable(Exception):
    """The sink cannot take writes right now (server down, timeout, disk full).

    The publisher buffers the batch and retries it whole, so a sink must raise this only when
    writing the batch again later is correct; a sink that may have written part of the batch
    before failing makes delivery at-least-once, which the event contract allows. Anything
    else a sink raises is a bug: ``publish`` lets it through to the caller.
    """


class EventSink(abc.ABC):
    """Writes events somewhere. Called from several camera threads at once and from the
    publisher's flusher thread; each call's batch is in order, and the publisher never hands
    one camera's events to two calls at the same time."""

    #: Names the transport in log lines ("Redis reachable again").
    name: str = "event sink"

    @abc.abstractmethod
    def write(self, events: Sequence[ExpressionEvent]) -> None:
        """Write all of ``events`` (stamped with ``publish_time``), in order, or raise
        ``EventSinkUnavailable`` so the publisher retries the batch later."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release what the sink holds (connections, files). Called once, after the last write."""
