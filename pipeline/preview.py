"""The opt-in annotated preview: a camera's latest processed frame with its faces boxed and labelled, as JPEG.

Off unless a camera asks for it (``preview: true``): the preview carries face pixels out of
the process that decoded them, which events never do. An ingest worker that runs such a
camera keeps the newest JPEG in Redis under ``<prefix>:preview:<camera_id>`` with a short TTL,
so any API replica can serve it whichever worker runs the camera, and a stopped camera's
preview disappears on its own.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import cv2
import numpy as np
import redis

from pipeline.detection import FaceDetection

BOX_COLOUR = (80, 220, 80)  # BGR
LABEL_TEXT_COLOUR = (0, 0, 0)


@dataclasses.dataclass(frozen=True)
class PreviewFace:
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in frame pixels
    emotion: str
    confidence: float

    @property
    def label(self) -> str:
        return f"{self.emotion} {self.confidence:.0%}"


def preview_faces(detections: Sequence[FaceDetection], probabilities: np.ndarray, classes: Sequence[str]) -> list[PreviewFace]:
    """Each detected face with the class the model put first."""
    faces = []
    for detection, row in zip(detections, probabilities, strict=True):
        top = int(np.argmax(row))
        x1, y1, x2, y2 = detection.box
        faces.append(PreviewFace((float(x1), float(y1), float(x2), float(y2)), classes[top], float(row[top])))
    return faces


def annotate(image: np.ndarray, faces: Sequence[PreviewFace], max_side: int = 640) -> np.ndarray:
    """A copy of ``image`` (BGR), shrunk to ``max_side`` at most, with a box and a label per face.

    The frame is shared with other consumers, so it is never drawn on in place.
    """
    height, width = image.shape[:2]
    scale = min(1.0, max_side / max(height, width))
    if scale < 1.0:
        canvas = cv2.resize(image, (max(1, round(width * scale)), max(1, round(height * scale))), interpolation=cv2.INTER_AREA)
    else:
        canvas = image.copy()
    thickness = max(1, round(2 * max(canvas.shape[:2]) / 640))
    for face in faces:
        x1, y1, x2, y2 = (round(value * scale) for value in face.box)
        cv2.rectangle(canvas, (x1, y1), (x2, y2), BOX_COLOUR, thickness)
        (text_w, text_h), baseline = cv2.getTextSize(face.label, cv2.FONT_HERSHEY_SIMPLEX, 0.5, 1)
        # The label sits above the box, or inside its top when the box touches the frame's top.
        top = y1 - text_h - baseline - 2 if y1 - text_h - baseline - 2 >= 0 else y1
        cv2.rectangle(canvas, (x1, top), (x1 + text_w + 4, top + text_h + baseline + 2), BOX_COLOUR, cv2.FILLED)
        cv2.putText(canvas, face.label, (x1 + 2, top + text_h + 1), cv2.FONT_HERSHEY_SIMPLEX, 0.5, LABEL_TEXT_COLOUR, 1, cv2.LINE_AA)
    return canvas


def encode_jpeg(image: np.ndarray, quality: int = 80) -> bytes:
    ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buffer.tobytes()


class PreviewStore:
    """The newest preview JPEG of each camera, in Redis with a TTL."""

    def __init__(self, client: redis.Redis, prefix: str, ttl_s: float = 10.0) -> None:
        self.client = client
        self.prefix = prefix
        self.ttl_ms = int(ttl_s * 1000)

    def key(self, camera_id: str) -> str:
        return f"{self.prefix}:preview:{camera_id}"

    def put(self, camera_id: str, jpeg: bytes) -> None:
        self.client.set(self.key(camera_id), jpeg, px=self.ttl_ms)

    def get(self, camera_id: str) -> bytes | None:
        value = self.client.get(self.key(camera_id))
        return bytes(value) if value is not None else None

    def delete(self, camera_id: str) -> None:
        self.client.delete(self.key(camera_id))


class PreviewWriter:
    """One camera's side: draws and stores a processed frame at most every ``interval_s``
    (a page refreshes it about once a second; drawing and encoding every frame would cost CPU
    the models need)."""

    def __init__(
        self,
        store: PreviewStore,
        camera_id: str,
        classes: Sequence[str],
        interval_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.camera_id = camera_id
        self.classes = tuple(classes)
        self.interval_s = interval_s
        self.clock = clock
        self._last: float | None = None

    def offer(self, image: np.ndarray, detections: Sequence[FaceDetection], probabilities: np.ndarray) -> bool:
        """Store this frame's preview unless one was stored less than ``interval_s`` ago; True when stored."""
        now = self.clock()
        if self._last is not None and now - self._last < self.interval_s:
            return False
        self._last = now
        faces = preview_faces(detections, probabilities, self.classes)
        self.store.put(self.camera_id, encode_jpeg(annotate(image, faces)))
        return True

    def close(self) -> None:
        self.store.delete(self.camera_id)
