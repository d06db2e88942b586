"""Which camera outcomes and event losses make which exit status."""

from pipeline.exit_codes import ExitCode, run_exit_code
from pipeline.frames import SourceStatus, StreamState


def status(state: StreamState, frames_decoded: int = 0, last_error: str | None = None) -> SourceStatus:
    return SourceStatus("cam", "x.mp4", state, 0.0, 0.0, None, 0, frames_decoded, 0, last_error)


def test_a_run_where_cameras_worked_and_everything_was_delivered_is_ok():
    assert run_exit_code([status(StreamState.ENDED, 100), status(StreamState.STREAMING, 5)], events_lost=0) == ExitCode.OK == 0


def test_no_camera_worked_when_each_gave_up_or_never_opened():
    failed = status(StreamState.FAILED, 50, "open: refused")  # worked for a while, then gave up
    never_opened = status(StreamState.RECONNECTING, 0, "open: cannot open rtsp://cam/1: timeout")
    assert run_exit_code([failed, never_opened], events_lost=0) == ExitCode.NO_CAMERA_WORKED == 3
    # It wins over lost events: the bigger failure.
    assert run_exit_code([failed], events_lost=10) == ExitCode.NO_CAMERA_WORKED


def test_one_working_camera_is_enough_and_a_camera_still_connecting_has_not_failed():
    assert run_exit_code([status(StreamState.FAILED, 0, "open: x"), status(StreamState.ENDED, 10)], events_lost=0) == ExitCode.OK
    assert run_exit_code([status(StreamState.CONNECTING)], events_lost=0) == ExitCode.OK


def test_events_lost_at_close_make_exit_4():
    assert run_exit_code([status(StreamState.ENDED, 10)], events_lost=1) == ExitCode.EVENTS_LOST == 4
