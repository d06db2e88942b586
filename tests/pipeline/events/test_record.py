"""The event record: its stream-field encoding and decoding, and the JSON Schema checks."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from pipeline.events import (
    UNCERTAIN,
    EventDecodeError,
    EventValidationError,
    ExpressionEvent,
    event_schema,
    new_run_id,
    validate_event_dict,
)
from tests.pipeline.events.helpers import CAPTURE_TIME, RUN_ID, make_event

# -- encoding -------------------------------------------------------------------------------------


def test_fields_round_trip() -> None:
    event = make_event(publish_time=CAPTURE_TIME + 0.125, pts_s=1 / 3)
    fields = event.to_fields()
    assert all(isinstance(key, str) and isinstance(value, str) for key, value in fields.items())
    assert fields["box"] == "[10,20,110,140]"
    assert json.loads(fields["probabilities"]) == event.probabilities
    assert fields["schema_version"] == "3" and fields["run_id"] == RUN_ID
    assert ExpressionEvent.from_fields(fields) == event
    # As redis-py returns them without decode_responses.
    raw = {key.encode(): value.encode() for key, value in fields.items()}
    decoded = ExpressionEvent.from_fields(raw)
    assert decoded == event
    assert decoded.pts_s == 1 / 3  # floats round-trip exactly


def test_unknown_fields_are_ignored() -> None:
    fields = make_event(publish_time=CAPTURE_TIME + 1).to_fields() | {"added_later": "x"}
    assert ExpressionEvent.from_fields(fields).emotion == "happy"


def test_numpy_values_are_normalised() -> None:
    event = make_event(detector_score=np.float32(0.5), frame_index=np.int64(9), box=tuple(np.array([1, 2, 3, 4], dtype=np.int32)))
    assert type(event.detector_score) is float and type(event.frame_index) is int
    assert all(type(value) is int for value in event.box)
    assert event.to_fields()["detector_score"] == "0.5"


def test_float_box_is_refused() -> None:
    with pytest.raises(EventDecodeError) as caught:
        make_event(box=(1.5, 2, 3, 4))
    assert caught.value.field == "box"


def test_event_is_immutable() -> None:
    probabilities = {"happy": 0.9, "sad": 0.1}
    event = make_event(probabilities=probabilities, emotion="happy", confidence=0.9)
    probabilities["happy"] = 0.0
    assert event.probabilities["happy"] == 0.9
    with pytest.raises(AttributeError):
        event.emotion = "sad"  # type: ignore[misc]
    assert hash(event) == hash(make_event(probabilities={"happy": 0.9, "sad": 0.1}, emotion="happy", confidence=0.9))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("schema_version", "4"),
        ("schema_version", "0"),
        ("schema_version", "one"),
        ("run_id", ""),
        ("run_id", "has space"),
        ("frame_index", "7.5"),
        ("track_id", ""),
        ("pts_s", "abc"),
        ("capture_time", "nan"),
        ("publish_time", "inf"),
        ("box", "[1,2,3]"),
        ("box", "[1,2,3,4.5]"),
        ("box", "{not json"),
        ("probabilities", "[]"),
        ("probabilities", '{"happy":"high"}'),
        ("camera_id", ""),
        ("emotion", b"\xff\xfe"),
        ("confidence", "NaN"),
    ],
)
def test_from_fields_errors_name_the_field(field: str, value: str | bytes) -> None:
    fields: dict[str, str | bytes] = dict(make_event(publish_time=CAPTURE_TIME + 1).to_fields())
    fields[field] = value
    with pytest.raises(ValueError, match=repr(field)) as caught:
        ExpressionEvent.from_fields(fields)
    assert isinstance(caught.value, EventDecodeError) and caught.value.field == field


def test_from_fields_missing_field() -> None:
    fields = make_event(publish_time=CAPTURE_TIME + 1).to_fields()
    del fields["model_id"]
    with pytest.raises(ValueError, match="'model_id': missing"):
        ExpressionEvent.from_fields(fields)


def test_from_fields_missing_run_id_in_a_version_2_entry() -> None:
    fields = make_event(publish_time=CAPTURE_TIME + 1).to_fields()
    del fields["run_id"]
    with pytest.raises(EventDecodeError, match="'run_id': missing"):
        ExpressionEvent.from_fields(fields)


def test_a_version_1_entry_still_decodes_without_a_run_id() -> None:
    # Written by a producer from before run_id: left in the stream across an upgrade.
    fields = make_event(publish_time=CAPTURE_TIME + 1).to_fields() | {"schema_version": "1"}
    del fields["run_id"]
    event = ExpressionEvent.from_fields(fields)
    assert (event.schema_version, event.run_id, event.frame_index) == (1, None, 7)
    assert "run_id" not in event.to_fields() and ExpressionEvent.from_fields(event.to_fields()) == event


def test_a_version_2_entry_still_decodes() -> None:
    # Written before version 3 allowed an 'uncertain' emotion: the same fields, so it reads as it was.
    fields = make_event(publish_time=CAPTURE_TIME + 1).to_fields() | {"schema_version": "2"}
    event = ExpressionEvent.from_fields(fields)
    assert (event.schema_version, event.run_id, event.emotion) == (2, RUN_ID, "happy")


def test_an_uncertain_event_round_trips_with_its_probabilities() -> None:
    event = make_event(
        publish_time=CAPTURE_TIME + 1, emotion=UNCERTAIN, confidence=0.4, probabilities={"happy": 0.4, "sad": 0.35, "neutral": 0.25}
    )
    decoded = ExpressionEvent.from_fields(event.to_fields())
    assert decoded == event and decoded.emotion == "uncertain" and decoded.probabilities["happy"] == 0.4


def test_a_version_2_event_needs_a_run_id() -> None:
    with pytest.raises(EventDecodeError, match="run_id"):
        make_event(run_id=None)
    assert new_run_id() != new_run_id() and len(new_run_id()) == 32
    make_event(run_id=new_run_id())  # the producer's ids follow the pattern


# -- schema ---------------------------------------------------------------------------------------


def test_schema_is_valid_draft_2020_12_and_describes_every_field() -> None:
    import jsonschema

    schema = event_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert set(schema["required"]) == set(make_event().to_json_dict())
    assert all("description" in prop for prop in schema["properties"].values())


def test_schema_accepts_a_published_event() -> None:
    data = make_event(publish_time=CAPTURE_TIME + 0.1).to_json_dict()
    validate_event_dict(data)
    validate_event_dict(json.loads(json.dumps(data)))  # and after a trip through JSON


def test_schema_accepts_an_uncertain_event() -> None:
    data = make_event(publish_time=CAPTURE_TIME + 0.1, emotion=UNCERTAIN, confidence=0.4).to_json_dict()
    assert data["schema_version"] == 3
    validate_event_dict(data)


@pytest.mark.parametrize(
    ("path", "change"),
    [
        ("confidence", {"confidence": 1.5}),
        ("schema_version", {"schema_version": 1}),
        ("schema_version", {"schema_version": 2}),  # the schema describes the version producers write
        ("run_id", {"run_id": ""}),
        ("run_id", {"run_id": None}),
        ("box", {"box": [1, 2, 3]}),
        ("box.3", {"box": [1, 2, 3, "4"]}),
        ("camera_id", {"camera_id": "bad camera"}),
        ("probabilities.happy", {"probabilities": {"happy": -0.1}}),
        ("publish_time", {"publish_time": 0.0}),  # never stamped by a publisher
        ("<root>", {"extra": 1}),
        ("emotion", {"emotion": "angry"}),  # not one of the probabilities' classes
        ("emotion", {"emotion": "Uncertain"}),  # nor exactly 'uncertain'
    ],
)
def test_schema_rejects_bad_events(path: str, change: dict[str, Any]) -> None:
    data = make_event(publish_time=CAPTURE_TIME + 0.1).to_json_dict() | change
    with pytest.raises(EventValidationError) as caught:
        validate_event_dict(data)
    assert caught.value.path == path


def test_schema_rejects_a_missing_field() -> None:
    data = make_event(publish_time=CAPTURE_TIME + 0.1).to_json_dict()
    del data["track_id"]
    with pytest.raises(EventValidationError, match="track_id"):
        validate_event_dict(data)
