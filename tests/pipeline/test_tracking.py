import numpy as np
import pytest

from pipeline.config import TrackerConfig
from pipeline.detection import FaceDetection
from pipeline.tracking import IoUTracker, iou


def face(x: float, y: float, size: float = 50.0) -> FaceDetection:
    return FaceDetection(box=(x, y, x + size, y + size), score=0.99)


def probs(*values: float) -> np.ndarray:
    return np.array([values], dtype=np.float32)


def test_iou_by_hand():
    assert iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0


def test_ids_are_stable_while_faces_move_a_little():
    tracker = IoUTracker(TrackerConfig())
    first = tracker.update([face(0, 0), face(200, 0)], np.full((2, 2), 0.5))
    ids = [f.track_id for f in first.faces]
    assert ids == [1, 2]
    # Same faces moved slightly, listed in the other order.
    second = tracker.update([face(205, 3), face(4, 2)], np.full((2, 2), 0.5))
    assert [f.track_id for f in second.faces] == [2, 1]


def test_tracks_end_after_max_missed_and_ids_are_never_reused():
    tracker = IoUTracker(TrackerConfig(max_missed_frames=1))
    tracker.update([face(0, 0)], probs(1, 0))
    assert tracker.update([], np.zeros((0, 2))).ended_track_ids == []
    assert tracker.update([], np.zeros((0, 2))).ended_track_ids == [1]
    again = tracker.update([face(0, 0)], probs(1, 0))
    assert again.faces[0].track_id == 2


def test_ema_smoothing_damps_a_one_frame_flip():
    tracker = IoUTracker(TrackerConfig(ema_alpha=0.3))
    tracker.update([face(0, 0)], probs(0.9, 0.1))
    flipped = tracker.update([face(1, 1)], probs(0.1, 0.9)).faces[0].probabilities
    np.testing.assert_allclose(flipped, [0.3 * 0.1 + 0.7 * 0.9, 0.3 * 0.9 + 0.7 * 0.1], rtol=1e-6)
    assert int(np.argmax(flipped)) == 0, "a single contrary frame does not flip the label"


def test_no_smoothing_with_alpha_one():
    tracker = IoUTracker(TrackerConfig(ema_alpha=1.0))
    tracker.update([face(0, 0)], probs(0.9, 0.1))
    np.testing.assert_allclose(tracker.update([face(0, 0)], probs(0.2, 0.8)).faces[0].probabilities, [0.2, 0.8])


def test_mismatched_inputs_are_rejected():
    with pytest.raises(ValueError, match="2 detections but 1"):
        IoUTracker(TrackerConfig()).update([face(0, 0), face(100, 0)], probs(1, 0))


def test_carried_detections_move_on_at_the_velocity_between_detections_and_skip_unseen_faces():
    tracker = IoUTracker(TrackerConfig(max_missed_frames=5))
    one = np.array([[1.0, 0.0]], np.float32)
    tracker.update([FaceDetection((0.0, 0.0, 20.0, 20.0), 0.9, ((5.0, 5.0),))], one)
    tracker.update([FaceDetection((4.0, 2.0, 24.0, 22.0), 0.9, ((9.0, 7.0),))], one)  # 4, 2 px per frame
    (carried,) = tracker.carried_detections()
    assert carried.box == (8.0, 4.0, 28.0, 24.0) and carried.landmarks == ((13.0, 9.0),) and carried.score == 0.9
    tracker.update([carried], one, carried=True)
    (again,) = tracker.carried_detections()
    assert again.box == (12.0, 6.0, 32.0, 26.0)  # a carried box teaches no new velocity
    tracker.update([], np.zeros((0, 2), np.float32))  # the face is missed: nothing to carry
    assert tracker.carried_detections() == []
