from __future__ import annotations

import time

import cv2
import numpy as np
import pytest
import redis

from pipeline.detection import FaceDetection
from pipeline.preview import BOX_COLOUR, PreviewFace, PreviewStore, PreviewWriter, annotate, encode_jpeg, preview_faces

CLASSES = ("angry", "happy", "sad")


def grey(width: int = 320, height: int = 240) -> np.ndarray:
    return np.full((height, width, 3), 128, np.uint8)


def test_each_face_gets_its_top_class_and_confidence():
    detections = [FaceDetection((10, 20, 60, 80), 0.99), FaceDetection((100, 20, 150, 80), 0.95)]
    probabilities = np.array([[0.1, 0.7, 0.2], [0.6, 0.1, 0.3]], np.float32)
    faces = preview_faces(detections, probabilities, CLASSES)
    assert [(face.emotion, round(face.confidence, 2), face.box) for face in faces] == [
        ("happy", 0.7, (10.0, 20.0, 60.0, 80.0)),
        ("angry", 0.6, (100.0, 20.0, 150.0, 80.0)),
    ]
    assert faces[0].label == "happy 70%"


def test_annotate_draws_box_and_label_on_a_copy():
    image = grey()
    canvas = annotate(image, [PreviewFace((100, 100, 200, 200), "happy", 0.7)])
    assert (image == 128).all(), "the shared frame is left alone"
    assert tuple(canvas[150, 100]) == BOX_COLOUR  # left edge of the box
    assert tuple(canvas[150, 150]) == (128, 128, 128)  # inside the box: the face stays visible
    label_area = canvas[80:100, 100:180]
    assert (label_area == BOX_COLOUR).all(axis=2).any() and (label_area == 0).all(axis=2).any(), "a filled label with text"


def test_a_face_at_the_top_edge_has_its_label_inside_the_box():
    canvas = annotate(grey(), [PreviewFace((10, 0, 110, 100), "sad", 0.5)])
    assert (canvas[2:12, 12:60] == 0).all(axis=2).any()


def test_big_frames_are_shrunk_with_their_boxes():
    canvas = annotate(grey(1280, 720), [PreviewFace((400, 200, 800, 600), "sad", 0.9)], max_side=640)
    assert canvas.shape == (360, 640, 3)
    assert tuple(canvas[200, 200]) == BOX_COLOUR  # (400, 400) / 2


def test_the_jpeg_decodes_back_to_the_picture():
    canvas = annotate(grey(), [PreviewFace((100, 100, 200, 200), "happy", 0.7)])
    decoded = cv2.imdecode(np.frombuffer(encode_jpeg(canvas), np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == canvas.shape
    assert np.abs(decoded.astype(int) - canvas.astype(int)).mean() < 4


class MemoryStore(PreviewStore):
    def __init__(self) -> None:
        self.saved: dict[str, bytes] = {}

    def put(self, camera_id: str, jpeg: bytes) -> None:
        self.saved[camera_id] = jpeg

    def delete(self, camera_id: str) -> None:
        self.saved.pop(camera_id, None)


def test_the_writer_stores_at_most_one_frame_per_interval_and_clears_it_on_close():
    now = [0.0]
    store = MemoryStore()
    writer = PreviewWriter(store, "cam1", CLASSES, interval_s=0.5, clock=lambda: now[0])
    detections = [FaceDetection((10, 20, 60, 80), 0.99)]
    probabilities = np.array([[0.1, 0.7, 0.2]], np.float32)
    stored = []
    for step in range(10):  # 10 frames at 5 fps
        now[0] = step * 0.2
        stored.append(writer.offer(grey(), detections, probabilities))
    assert stored == [True, False, False, True, False, False, True, False, False, True]
    assert store.saved["cam1"].startswith(b"\xff\xd8")  # a JPEG
    writer.close()
    assert store.saved == {}


@pytest.mark.integration
def test_the_store_keeps_the_newest_jpeg_in_redis_with_a_ttl(redis_server):
    store = PreviewStore(redis.Redis.from_url(redis_server.url), "test", ttl_s=0.5)
    assert store.get("cam1") is None
    store.put("cam1", b"\xff\xd8one")
    store.put("cam1", b"\xff\xd8two")
    assert store.get("cam1") == b"\xff\xd8two"
    time.sleep(0.7)
    assert store.get("cam1") is None
    store.put("cam1", b"\xff\xd8three")
    store.delete("cam1")
    assert store.get("cam1") is None
