"""The emission policy: every_face and on_change with heartbeats, per-camera state and expiry."""

from __future__ import annotations

import pytest

from pipeline.events import EmissionPolicy
from tests.pipeline.events.helpers import frame_events, make_event

# -- emission policy ------------------------------------------------------------------------------


def test_every_face_emits_everything() -> None:
    policy = EmissionPolicy("every_face")
    events = frame_events("cam1", 0, faces=3)
    assert policy.select("cam1", events, now=0.0) == events
    assert policy.select("cam1", events, now=0.1) == events
    assert policy.tracked() == 0  # keeps no state


def test_on_change_emits_new_changed_and_heartbeat() -> None:
    policy = EmissionPolicy("on_change", heartbeat_s=5.0)

    def emitted(now: float, emotion: str, track_id: int = 1) -> bool:
        return bool(policy.select("cam1", [make_event(track_id=track_id, emotion=emotion)], now=now))

    assert emitted(0.0, "happy")  # new track
    assert not emitted(1.0, "happy")
    assert not emitted(4.9, "happy")
    assert emitted(5.0, "happy")  # heartbeat
    assert not emitted(6.0, "happy")
    assert emitted(6.5, "sad")  # change
    assert not emitted(7.0, "sad")
    assert emitted(7.5, "happy")  # change back
    assert not emitted(12.0, "happy")  # the heartbeat counts from the last emission (7.5)
    assert emitted(12.5, "happy")
    assert emitted(12.6, "happy", track_id=2)  # another new track


def test_on_change_selects_per_face_within_a_frame() -> None:
    policy = EmissionPolicy("on_change", heartbeat_s=5.0)
    policy.select("cam1", [make_event(track_id=1), make_event(track_id=2)], now=0.0)
    frame = [make_event(track_id=1, emotion="happy"), make_event(track_id=2, emotion="sad"), make_event(track_id=3)]
    assert [event.track_id for event in policy.select("cam1", frame, now=1.0)] == [2, 3]


def test_on_change_state_is_per_camera_and_forgettable() -> None:
    policy = EmissionPolicy("on_change", heartbeat_s=5.0)
    policy.select("cam1", [make_event(track_id=1)], now=0.0)
    assert policy.select("cam2", [make_event(camera_id="cam2", track_id=1)], now=0.1)  # same id, other camera
    assert policy.tracked() == 2

    policy.forget("cam1", 1)
    assert policy.tracked("cam1") == 0
    assert policy.select("cam1", [make_event(track_id=1)], now=1.0)  # new again
    policy.forget("cam1", 99)  # unknown: no error
    policy.forget_camera("cam2")
    policy.forget_camera("nope")
    assert policy.tracked() == 1


def test_on_change_expires_tracks_never_forgotten() -> None:
    policy = EmissionPolicy("on_change", heartbeat_s=1.0, idle_expiry_s=10.0)
    for track_id in range(100):
        policy.select("cam1", [make_event(track_id=track_id)], now=float(track_id))
    assert policy.tracked("cam1") <= 11  # only the tracks seen in the last 10 s survive


def test_policy_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="sometimes"):
        EmissionPolicy("sometimes")  # type: ignore[arg-type]
