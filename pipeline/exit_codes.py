"""What ``ferstream run`` exits with, so that a script can tell a run that worked from one that did not."""

from __future__ import annotations

import enum
from collections.abc import Sequence

from pipeline.frames import SourceStatus, StreamState


class ExitCode(enum.IntEnum):
    OK = 0
    ERROR = 1  # an error the run cannot start past, e.g. Redis does not answer
    USAGE = 2  # bad arguments or configuration (argparse uses 2 as well)
    NO_CAMERA_WORKED = 3  # every camera failed to open, or every camera ended in failure
    EVENTS_LOST = 4  # the run closed with events still undelivered
    INTERRUPTED = 130  # Ctrl-C out of `ferstream tail`


def camera_failed(status: SourceStatus) -> bool:
    """Gave up (``failed``), or never delivered a frame and has an error to show for it."""
    return status.state == StreamState.FAILED or (status.frames_decoded == 0 and status.last_error is not None)


def run_exit_code(statuses: Sequence[SourceStatus], events_lost: int) -> ExitCode:
    """A run where no camera worked is the bigger failure, so it wins over events lost at close."""
    if statuses and all(camera_failed(status) for status in statuses):
        return ExitCode.NO_CAMERA_WORKED
    if events_lost > 0:
        return ExitCode.EVENTS_LOST
    return ExitCode.OK
