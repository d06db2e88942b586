"""The labelled-clip scorer of benchmarks/stream_agreement.py: span matching, agreement counts, and the shipped labels."""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

from stream_agreement import DEFAULT_LABELS, Span, load_spans, score  # noqa: E402

from tests.pipeline.events.helpers import make_event  # noqa: E402

CLASSES = {"angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"}


def test_events_count_for_the_span_their_frame_and_face_centre_fall_in():
    spans = [
        Span("clip", "left", (0.0, 0.4), (0, 9), "neutral"),
        Span("clip", "right", (0.6, 1.0), (5, 9), "happy"),
    ]
    events = [
        make_event(frame_index=0, box=(10, 10, 50, 50), emotion="neutral"),  # left, agrees
        make_event(frame_index=1, box=(10, 10, 50, 50), emotion="sad"),  # left, disagrees
        make_event(frame_index=6, box=(70, 10, 90, 30), emotion="happy"),  # right (centre 0.8), agrees
        make_event(frame_index=2, box=(70, 10, 90, 30), emotion="happy"),  # right, before its span: unlabelled
        make_event(frame_index=3, box=(45, 10, 55, 30), emotion="sad"),  # centre 0.5: between the spans
        make_event(frame_index=12, box=(10, 10, 50, 50), emotion="neutral"),  # after every span
    ]
    result = score(events, spans, width=100)
    assert (result["events"], result["labelled_events"], result["unlabelled_events"], result["agree"]) == (6, 3, 3, 2)
    assert result["agreement"] == pytest.approx(2 / 3, abs=1e-4)
    assert result["by_expression"]["neutral"] == {"events": 2, "agree": 1, "said": {"neutral": 1, "sad": 1}}
    assert result["by_person"]["right (happy)"] == {"happy": 1}
    assert score([], spans, width=100)["agreement"] is None


def test_the_shipped_labels_are_well_formed(shared_clips):
    spans = load_spans(DEFAULT_LABELS)
    assert {span.clip for span in spans} <= set(shared_clips)
    for span in spans:
        assert span.expression in CLASSES
        assert 0.0 <= span.x_range[0] < span.x_range[1] <= 1.0 and 0 <= span.frames[0] <= span.frames[1]
