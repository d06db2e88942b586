"""The JSON-lines sink: lines in the schema's form, selected from the config, an unwritable path failing at start.

Copy this file for a new sink: write through the publisher, read back what the transport holds,
and select the sink from a config.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from pipeline.config import ConfigError, PipelineConfig, parse_config
from pipeline.events import EventPublisher, ExpressionEvent, JsonLinesSink, build_sink, validate_event_dict
from pipeline.metrics import PipelineMetrics
from tests.pipeline.events.helpers import frame_events, make_event, sample


def test_writes_one_schema_valid_line_per_event_in_order() -> None:
    out = io.StringIO()
    sink = JsonLinesSink(out=out)
    events = [event.with_publish_time(event.capture_time + 0.1) for event in frame_events("cam1", 4, faces=2)]
    sink.write(events)
    sink.write([make_event(frame_index=5, publish_time=events[0].publish_time)])
    lines = out.getvalue().splitlines()
    assert [(data["frame_index"], data["track_id"]) for data in map(json.loads, lines)] == [(4, 0), (4, 1), (5, 3)]
    for line in lines:
        validate_event_dict(json.loads(line))
    assert ExpressionEvent(**{**json.loads(lines[0]), "box": tuple(json.loads(lines[0])["box"])}) == events[0]
    sink.close()
    assert not out.closed  # a stream it was given stays the caller's


def test_a_config_selects_it_and_the_publisher_appends_to_the_file(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text('{"earlier": true}\n')
    config = parse_config(PipelineConfig, {"events": {"sink": {"kind": "jsonl", "path": str(path)}}}, "test")
    metrics = PipelineMetrics()
    publisher = EventPublisher(config.events, metrics)
    assert isinstance(publisher.sink, JsonLinesSink)
    for frame in range(3):
        publisher.publish("cam1", frame_events("cam1", frame))
    publisher.close()
    lines = path.read_text().splitlines()
    assert lines[0] == '{"earlier": true}'  # appended, not truncated
    assert [json.loads(line)["frame_index"] for line in lines[1:]] == [0, 1, 2]
    assert sample(metrics, "ferstream_events_published_total", {"camera": "cam1"}) == 3


def test_stdout_is_the_default_path(capsys: pytest.CaptureFixture[str]) -> None:
    config = parse_config(PipelineConfig, {"events": {"sink": {"kind": "jsonl"}}}, "test")
    sink = build_sink(config.events)
    sink.write([make_event(publish_time=1_700_000_001.0)])
    sink.close()
    assert json.loads(capsys.readouterr().out)["emotion"] == "happy"


def test_an_unwritable_path_fails_at_start_naming_the_field(tmp_path: Path) -> None:
    config = parse_config(PipelineConfig, {"events": {"sink": {"kind": "jsonl", "path": str(tmp_path / "missing" / "x.jsonl")}}}, "t")
    with pytest.raises(ConfigError, match="events.sink.path"):
        build_sink(config.events)
