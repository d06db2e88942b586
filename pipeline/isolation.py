"""Failure isolation for batched model calls: a frame whose input makes a model fail costs that frame only.

Batching puts frames of several cameras into one model call, so one camera's bad frame (a
1920x40 clip for which MTCNN has no image pyramid, say) would fail the whole batch. ``call_per_unit``
runs the batch once and, only when that call raises, runs each unit (a frame, or a frame's face
crops) alone, so the others get their results and the failing unit gets a ``UnitFailure``.
``FrameFailures`` counts a lost frame in ``frames_failed_total{camera,stage}`` and logs it
rate-limited. The runner and the Serve deployments both use them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from pipeline.log_limits import RepeatLimitedLog
from pipeline.metrics import PipelineMetrics

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")

FAILURE_STAGES = ("detect", "classify", "track", "publish")
# How much of an error message goes into the log line and the rate-limit key.
ERROR_TEXT_CHARS = 200
# A camera whose frame failed a stage has its frames called alone in that stage for this long.
SUSPECT_S = 10.0


@dataclass(frozen=True)
class UnitFailure(Generic[ItemT]):
    """The model call failed on this unit's items alone."""

    error: Exception


def call_per_unit(
    call: Callable[[list[ItemT]], Sequence[ResultT]], units: Sequence[Sequence[ItemT]], alone: Collection[int] = ()
) -> list[list[ResultT] | UnitFailure[ItemT]]:
    """``call`` on the items of all units at once; when it raises, on each unit alone.

    ``call`` maps a list of items to one result per item. Returns, per unit, its results or the
    ``UnitFailure`` of its own call. The retry costs a second pass over the good units, but
    only while a bad input is in the batch; the units whose indices are in ``alone`` (say, a
    camera that failed a moment ago) are called on their own from the start, so that a camera
    failing on every frame does not make every batch run twice.
    """
    results: list[list[ResultT] | UnitFailure[ItemT]] = [[] for _ in units]
    together = [index for index in range(len(units)) if index not in alone]
    for index in range(len(units)):
        if index in alone:
            results[index] = _unit_alone(call, units[index])
    flat = [item for index in together for item in units[index]]
    if not flat:
        return results
    try:
        batch = _results(call, flat)
    except Exception as error:
        for index in together:
            results[index] = UnitFailure(error) if len(together) == 1 else _unit_alone(call, units[index])
        return results
    offset = 0
    for index in together:
        results[index] = batch[offset : offset + len(units[index])]
        offset += len(units[index])
    return results


def _unit_alone(call: Callable[[list[ItemT]], Sequence[ResultT]], unit: Sequence[ItemT]) -> list[ResultT] | UnitFailure[ItemT]:
    if not unit:
        return []
    try:
        return _results(call, list(unit))
    except Exception as error:
        return UnitFailure(error)


def _results(call: Callable[[list[ItemT]], Sequence[ResultT]], items: list[ItemT]) -> list[ResultT]:
    results = list(call(items))
    if len(results) != len(items):
        raise RuntimeError(f"the model returned {len(results)} results for {len(items)} inputs")
    return results


def describe_error(error: BaseException) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = text[:ERROR_TEXT_CHARS]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class FrameFailures:
    """Counts and logs frames lost to a failing stage, and remembers which cameras failed lately
    (``recently_failed``) so their next frames can be called alone. One per process, shared by its
    cameras; thread-safe."""

    def __init__(
        self,
        metrics: PipelineMetrics,
        logger: logging.Logger,
        log: RepeatLimitedLog | None = None,
        *,
        suspect_s: float = SUSPECT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.metrics = metrics
        self.log = log if log is not None else RepeatLimitedLog(logger)
        self.suspect_s = suspect_s
        self._clock = clock
        self._lock = threading.Lock()
        self._failed_at: dict[tuple[str, str], float] = {}
        self._counts: dict[str, dict[str, int]] = {}

    def record(self, camera_id: str, stage: str, frame_index: int, error: BaseException) -> None:
        if stage not in FAILURE_STAGES:
            raise ValueError(f"unknown stage {stage!r}; one of {FAILURE_STAGES}")
        self.metrics.frames_failed.labels(camera=camera_id, stage=stage).inc()
        with self._lock:
            self._failed_at[(camera_id, stage)] = self._clock()
            per_stage = self._counts.setdefault(camera_id, {})
            per_stage[stage] = per_stage.get(stage, 0) + 1
        description = describe_error(error)
        # With its traceback, at most once per REPEAT_LOG_INTERVAL_S for the same camera, stage and error.
        self.log.warning(
            (camera_id, stage, description),
            "camera %s: frame %d lost in %s: %s",
            camera_id,
            frame_index,
            stage,
            description,
            exc_info=error,
        )

    def recently_failed(self, camera_id: str, stage: str) -> bool:
        """Whether a frame of this camera failed ``stage`` within the last ``suspect_s``."""
        with self._lock:
            failed_at = self._failed_at.get((camera_id, stage))
            if failed_at is None:
                return False
            if self._clock() - failed_at < self.suspect_s:
                return True
            del self._failed_at[(camera_id, stage)]
            return False

    def counts(self) -> dict[str, dict[str, int]]:
        """Frames lost so far, camera -> stage -> count (for an operator's view; the metric is the record)."""
        with self._lock:
            return {camera: dict(stages) for camera, stages in self._counts.items()}

    def forget_camera(self, camera_id: str) -> None:
        with self._lock:
            self._counts.pop(camera_id, None)
            for key in [key for key in self._failed_at if key[0] == camera_id]:
                del self._failed_at[key]
