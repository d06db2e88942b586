"""Selecting a sink from the config: one builder per kind, Redis by default, a bad kind naming the field."""

from __future__ import annotations

import typing

import pytest

from pipeline.config import ConfigError, EventsConfig, EventSinkConfig, PipelineConfig, parse_config
from pipeline.events import SINK_BUILDERS, RedisStreamSink, build_sink


def test_every_configurable_kind_has_a_builder() -> None:
    members = typing.get_args(typing.get_args(EventSinkConfig)[0])
    kinds = {typing.get_args(member.model_fields["kind"].annotation)[0] for member in members}
    assert kinds == set(SINK_BUILDERS) == {"redis", "jsonl"}


def test_redis_is_the_default_sink() -> None:
    config = EventsConfig()
    assert config.sink.kind == "redis"
    sink = build_sink(config)  # connects lazily: no server needed
    assert isinstance(sink, RedisStreamSink)
    sink.close()


@pytest.mark.parametrize(("sink", "message"), [({"kind": "kafka"}, "'kafka'"), ({"path": "x"}, "'kind'")])
def test_a_bad_sink_kind_fails_naming_the_field(sink: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match="cfg.yaml: events.sink: ") as caught:
        parse_config(PipelineConfig, {"events": {"sink": sink}}, "cfg.yaml")
    assert message in str(caught.value) and "'kind'" in str(caught.value)


def test_a_jsonl_setting_on_the_redis_sink_is_refused() -> None:
    with pytest.raises(ConfigError, match="events.sink.redis.path"):
        parse_config(PipelineConfig, {"events": {"sink": {"kind": "redis", "path": "x"}}}, "cfg.yaml")
