"""The expression event: the record, its flat stream-field encoding and decoding, and the JSON Schema checks.

Each encoded event is a flat map of strings (``ExpressionEvent.to_fields``), so any Redis client
can read a stream entry without a ferstream import; ``box`` and ``probabilities`` are compact
JSON because streams have no nested values. The decoded form (``to_json_dict``) is what
``schemas/event.schema.json`` describes and what the JSON-lines sink writes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import operator
import re
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema

# 2 added run_id. 3 lets emotion be UNCERTAIN (events.abstain_below), which names no class of the
# probabilities. Readers still decode version-1 and -2 entries (written before an upgrade); version 1 with run_id None.
SCHEMA_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
# The emotion of an event whose smoothed top probability is below events.abstain_below (schema version 3 on).
UNCERTAIN = "uncertain"
SCHEMA_RESOURCE = "schemas/event.schema.json"
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


def new_run_id() -> str:
    """A fresh id for one start of a camera's analysis: random (UUID4, hex), so it never repeats across
    restarts, replicas, lease handovers or a camera deleted and added again."""
    return uuid.uuid4().hex


class EventDecodeError(ValueError):
    """A stream entry is not a valid event; ``field`` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"event field {field!r}: {message}")
        self.field = field


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExpressionEvent:
    """One tracked face in one processed frame.

    ``(camera_id, run_id, frame_index, track_id)`` identifies it: ``frame_index`` and
    ``track_id`` count from the start of a run (a camera's start on a process or replica), and
    ``run_id`` is new for every start. A consumer de-duplicates on that key (or on the stream
    entry id, for a write that was never retried).

    Values are normalised on construction (numpy scalars become Python ``int``/``float``,
    ``box`` a tuple), because upstream stages hand over numpy values and their ``repr``
    would leak into the stream encoding.
    """

    schema_version: int = SCHEMA_VERSION
    camera_id: str
    run_id: str | None  # None only in version-1 events, which had none
    frame_index: int
    pts_s: float
    capture_time: float  # unix seconds, when the frame was decoded
    publish_time: float = 0.0  # unix seconds; 0.0 until the publisher stamps it at write time
    track_id: int
    box: tuple[int, int, int, int]  # x1, y1, x2, y2 in full-frame pixels
    detector_score: float
    emotion: str
    confidence: float
    # Left out of the hash (a dict is unhashable); equal events still hash equal.
    probabilities: dict[str, float] = dataclasses.field(hash=False)
    model_id: str

    def __post_init__(self) -> None:
        for name in ("schema_version", "frame_index", "track_id"):
            object.__setattr__(self, name, _as_int(name, getattr(self, name)))
        for name in ("pts_s", "capture_time", "publish_time", "detector_score", "confidence"):
            object.__setattr__(self, name, _as_float(name, getattr(self, name)))
        box = tuple(_as_int("box", value) for value in self.box)
        if len(box) != 4:
            raise EventDecodeError("box", f"expected 4 values (x1, y1, x2, y2), got {len(box)}")
        object.__setattr__(self, "box", box)
        if self.run_id is None:
            if self.schema_version >= 2:
                raise EventDecodeError("run_id", f"required from schema version 2 (this event is version {self.schema_version})")
        elif not isinstance(self.run_id, str) or not RUN_ID_PATTERN.match(self.run_id):
            raise EventDecodeError("run_id", f"expected 1-64 characters of [A-Za-z0-9_.:-], got {self.run_id!r:.80}")
        # A private copy: the dataclass is frozen, so nobody should be able to mutate it via
        # the dict the caller still holds.
        object.__setattr__(self, "probabilities", {str(name): _as_float("probabilities", p) for name, p in self.probabilities.items()})

    def with_publish_time(self, publish_time: float) -> ExpressionEvent:
        return dataclasses.replace(self, publish_time=publish_time)

    def to_json_dict(self) -> dict[str, Any]:
        """The decoded event object described by ``schemas/event.schema.json``."""
        data = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        data["box"] = list(self.box)
        data["probabilities"] = dict(self.probabilities)
        return data

    def to_fields(self) -> dict[str, str]:
        """Flat stream fields: scalars as strings (floats via ``repr``, which round-trips
        exactly), ``box`` and ``probabilities`` as compact JSON."""
        fields: dict[str, str] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None:  # run_id of a version-1 event: absent, as it was
                continue
            if field.name == "box":
                fields["box"] = json.dumps(list(value), separators=(",", ":"))
            elif field.name == "probabilities":
                fields["probabilities"] = json.dumps(value, separators=(",", ":"))
            else:
                fields[field.name] = repr(value) if isinstance(value, float) else str(value)
        return fields

    @classmethod
    def from_fields(cls, fields: Mapping[bytes | str, bytes | str]) -> ExpressionEvent:
        """Decode a stream entry; raises ``EventDecodeError`` (a ``ValueError``) naming the bad field.

        Unknown extra fields are ignored, so a reader keeps working when a producer adds an
        optional field without bumping the schema version.
        """
        text: dict[str, str] = {}
        for raw_key, raw_value in fields.items():
            key = _decode_text("<field name>", raw_key)
            text[key] = _decode_text(key, raw_value)

        def get(name: str) -> str:
            try:
                return text[name]
            except KeyError:
                raise EventDecodeError(name, "missing") from None

        version = _parse_int("schema_version", get("schema_version"))
        if version not in READABLE_VERSIONS:
            readable = ", ".join(str(v) for v in READABLE_VERSIONS)
            raise EventDecodeError("schema_version", f"unsupported version {version} (this reader understands {readable})")
        return cls(
            schema_version=version,
            camera_id=_parse_nonempty("camera_id", get("camera_id")),
            run_id=get("run_id") if version >= 2 else None,
            frame_index=_parse_int("frame_index", get("frame_index")),
            pts_s=_parse_float("pts_s", get("pts_s")),
            capture_time=_parse_float("capture_time", get("capture_time")),
            publish_time=_parse_float("publish_time", get("publish_time")),
            track_id=_parse_int("track_id", get("track_id")),
            box=_parse_box(get("box")),
            detector_score=_parse_float("detector_score", get("detector_score")),
            emotion=_parse_nonempty("emotion", get("emotion")),
            confidence=_parse_float("confidence", get("confidence")),
            probabilities=_parse_probabilities(get("probabilities")),
            model_id=_parse_nonempty("model_id", get("model_id")),
        )


def _as_int(name: str, value: Any) -> int:
    # operator.index accepts int and numpy integers but refuses floats, so a float box or
    # frame index from an upstream bug fails loudly instead of being silently truncated.
    if isinstance(value, bool):
        raise EventDecodeError(name, f"expected an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise EventDecodeError(name, f"expected an integer, got {value!r}") from None


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, (bool, str, bytes)):
        raise EventDecodeError(name, f"expected a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise EventDecodeError(name, f"expected a number, got {value!r}") from None
    if not math.isfinite(number):
        # NaN/inf cannot be written as standard JSON, so they would break every consumer.
        raise EventDecodeError(name, f"expected a finite number, got {value!r}")
    return number


def _decode_text(name: str, value: bytes | str) -> str:
    if isinstance(value, str):
        return value
    try:
        return bytes(value).decode("utf-8")
    except (UnicodeDecodeError, TypeError):
        raise EventDecodeError(name, f"not UTF-8 text: {value!r:.80}") from None


def _parse_int(name: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise EventDecodeError(name, f"expected an integer, got {text!r:.80}") from None


def _parse_float(name: str, text: str) -> float:
    try:
        number = float(text)
    except ValueError:
        raise EventDecodeError(name, f"expected a number, got {text!r:.80}") from None
    return _as_float(name, number)


def _parse_nonempty(name: str, text: str) -> str:
    if not text:
        raise EventDecodeError(name, "empty")
    return text


def _parse_json(name: str, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise EventDecodeError(name, f"not valid JSON ({error.msg}): {text!r:.80}") from None


def _parse_box(text: str) -> tuple[int, int, int, int]:
    value = _parse_json("box", text)
    if not isinstance(value, list) or len(value) != 4 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise EventDecodeError("box", f"expected a JSON list of 4 integers, got {text!r:.80}")
    return (value[0], value[1], value[2], value[3])


def _parse_probabilities(text: str) -> dict[str, float]:
    value = _parse_json("probabilities", text)
    if not isinstance(value, dict) or not value:
        raise EventDecodeError("probabilities", f"expected a non-empty JSON object, got {text!r:.80}")
    return {name: _as_float("probabilities", p) for name, p in value.items()}


# -- schema -------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def event_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of the decoded event, loaded from package data."""
    # Relative to this file rather than importlib.resources.files("pipeline"): under pytest's
    # default import mode a tests/pipeline folder can shadow the package name, and the schema
    # ships in the ``pipeline`` package (package data, one level above this module) in every
    # install layout we support.
    text = (Path(__file__).resolve().parent.parent / SCHEMA_RESOURCE).read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


@functools.lru_cache(maxsize=1)
def _validator() -> jsonschema.protocols.Validator:
    schema = event_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


class EventValidationError(ValueError):
    """An event object does not match the schema; ``path`` is the dotted field path."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"event {path}: {message}")
        self.path = path


def validate_event_dict(data: Mapping[str, Any]) -> None:
    """Validate a decoded event object (``to_json_dict`` form) against the schema (version ``SCHEMA_VERSION``).

    Raises ``EventValidationError`` (a ``ValueError``) for the most relevant problem.
    """
    error = jsonschema.exceptions.best_match(_validator().iter_errors(data))
    if error is not None:
        path = ".".join(str(part) for part in error.absolute_path) or "<root>"
        raise EventValidationError(path, error.message)
    # One cross-field rule JSON Schema cannot express.
    if data["emotion"] not in data["probabilities"] and data["emotion"] != UNCERTAIN:
        raise EventValidationError("emotion", f"{data['emotion']!r} is neither {UNCERTAIN!r} nor one of the probabilities' classes")
