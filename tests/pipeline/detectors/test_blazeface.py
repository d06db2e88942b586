from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pipeline.config import BlazeFaceConfig, ConfigError, PipelineConfig, parse_config
from pipeline.detection import build_detector, detect_frames
from pipeline.detectors.blazeface import (
    MODELS,
    BlazeFaceDetector,
    Letterbox,
    decode,
    default_model_dir,
    inside_window,
    letterbox,
    ssd_anchors,
    suppress_contained,
    tile_windows,
    to_detections,
    to_pixels,
    weighted_nms,
)
from pipeline.detectors.tflite_graph import TFLiteGraph, TFLiteGraphError
from tests.media import decode_bgr_frames


@pytest.fixture(scope="module")
def blazeface() -> BlazeFaceDetector:
    return BlazeFaceDetector(BlazeFaceConfig())


def test_anchor_layouts_match_the_models_outputs():
    assert len(ssd_anchors(MODELS["full_range"])) == 2304  # 48 x 48 cells, one anchor each
    assert len(ssd_anchors(MODELS["short_range"])) == 896  # 16 x 16 x 2 + 8 x 8 x 6
    back = ssd_anchors(MODELS["back"])
    assert len(back) == 896
    # The first two anchors share the first 16-pixel cell of a 256 input; the 512th starts the 32-pixel grid.
    np.testing.assert_allclose(back[0], [0.5 / 16, 0.5 / 16])
    np.testing.assert_allclose(back[1], back[0])
    np.testing.assert_allclose(back[512], [0.5 / 8, 0.5 / 8])


def test_decode_places_a_box_on_its_anchor():
    anchors = np.array([[0.25, 0.5], [0.75, 0.75]], np.float32)
    raw = np.zeros((2, 16), np.float32)
    raw[1, :4] = [19.2, -19.2, 38.4, 19.2]  # +0.1, -0.1 offsets; 0.2 x 0.1 size, on a 192 input
    raw[1, 4:6] = [0.0, 19.2]  # first keypoint 0.1 below the anchor
    scores = np.array([-5.0, 5.0], np.float32)  # sigmoid: 0.0067 and 0.9933
    rows = decode(raw, scores, anchors, 192, threshold=0.5)
    assert rows.shape == (1, 17)
    np.testing.assert_allclose(rows[0, :4], [0.75, 0.6, 0.95, 0.7], atol=1e-6)
    np.testing.assert_allclose(rows[0, 4], 1 / (1 + np.exp(-5.0)), rtol=1e-6)
    np.testing.assert_allclose(rows[0, 5:7], [0.75, 0.85], atol=1e-6)
    assert decode(raw, np.array([-80.0, -1000.0], np.float32), anchors, 192, 0.5).shape == (0, 17)


def test_weighted_nms_blends_overlaps_and_keeps_separate_faces():
    rows = np.zeros((3, 17), np.float32)
    rows[0, :5] = [0.10, 0.10, 0.30, 0.30, 0.9]
    rows[1, :5] = [0.12, 0.12, 0.32, 0.32, 0.3]  # overlaps the first
    rows[2, :5] = [0.60, 0.60, 0.80, 0.80, 0.8]  # a second face
    merged = weighted_nms(rows, 0.3)
    assert len(merged) == 2
    np.testing.assert_allclose(merged[0, :4], [0.105, 0.105, 0.305, 0.305], atol=1e-6)
    assert merged[0, 4] == pytest.approx(0.9)
    np.testing.assert_allclose(merged[1, :5], rows[2, :5])


def test_letterbox_maps_model_coordinates_back_to_image_pixels():
    image = np.zeros((100, 200, 3), np.uint8)
    tensor, placement = letterbox(image, 128)
    assert tensor.shape == (128, 128, 3) and tensor.dtype == np.float32
    assert tensor.min() == pytest.approx(-1.0)
    assert placement == Letterbox(side=200.0, pad_x=0.0, pad_y=50.0)
    row = np.zeros(17, np.float32)
    row[:5] = [0.25, 0.25, 0.5, 0.5, 0.9]  # in the square: y 0.25 is 50 px, the top of the image
    row[5:7], row[7:9] = [0.45, 0.3], [0.3, 0.3]  # the subject's right eye is on the image's right here
    pixels = to_pixels(row[None], placement)
    (detection,) = to_detections(pixels, min_face_size=10)
    assert detection.box == pytest.approx((50.0, 0.0, 100.0, 50.0))
    assert detection.landmarks[0] == pytest.approx((60.0, 10.0))  # eyes in image order
    assert to_detections(pixels, min_face_size=60) == []
    # A tile's detections move by the tile's origin.
    shifted = to_pixels(row[None], Letterbox(side=200.0, pad_x=0.0, pad_y=50.0, origin_x=300.0, origin_y=20.0))
    np.testing.assert_allclose(shifted[0, :4], [350.0, 20.0, 400.0, 70.0], atol=1e-4)
    np.testing.assert_allclose(shifted[0, 5:7], [390.0, 30.0], atol=1e-4)


def test_tile_windows_cover_the_image_with_the_overlap_shared():
    windows = tile_windows(640, 360, columns=3, rows=2, overlap=0.25)
    assert len(windows) == 6
    assert windows[0][:2] == (0, 0) and windows[-1][2:] == (640, 360)
    (a, _, a_end, _), (b, _, _, _) = windows[0], windows[1]
    assert a_end - b == pytest.approx(0.25 * (a_end - a), abs=1)  # neighbours share a quarter of a tile
    covered = np.zeros((360, 640), bool)
    for x0, y0, x1, y1 in windows:
        covered[y0:y1, x0:x1] = True
    assert covered.all()
    assert tile_windows(640, 360, 1, 1, 0.25) == [(0, 0, 640, 360)]


def test_a_box_cut_by_an_inner_tile_edge_is_dropped_but_not_one_at_the_image_border():
    rows = np.zeros((3, 17), np.float32)
    rows[0, :4] = [10, 10, 50, 50]  # inside the tile, touching the image's top-left border
    rows[1, :4] = [290, 10, 330, 50]  # crosses the tile's right edge (x = 300), shared with a neighbour
    rows[2, :4] = [100, 170, 140, 199.5]  # touches the tile's bottom edge (y = 200), shared too
    keep = inside_window(rows, (0, 0, 300, 200), width=640, height=360, margin=1.0)
    assert keep.tolist() == [True, False, False]
    assert inside_window(rows, (0, 0, 640, 360), width=640, height=360, margin=1.0).all()


@pytest.mark.parametrize("model", sorted(MODELS))
def test_tflite_graph_in_torch_matches_the_tflite_runtime(model):
    from ai_edge_litert.interpreter import Interpreter

    path = default_model_dir() / MODELS[model].file
    graph = TFLiteGraph(path).eval()
    interpreter = Interpreter(model_path=str(path), num_threads=1)
    interpreter.allocate_tensors()
    size = MODELS[model].input_size
    images = np.random.default_rng(0).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
    with torch.no_grad():
        ours = graph(torch.from_numpy(images).permute(0, 3, 1, 2))
    for index in range(2):
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], images[index : index + 1])
        interpreter.invoke()
        for output, detail in zip(ours, interpreter.get_output_details(), strict=True):
            np.testing.assert_allclose(output[index].numpy(), interpreter.get_tensor(detail["index"])[0], atol=1e-3)


def test_tflite_graph_refuses_a_file_that_is_not_a_model(tmp_path: Path):
    garbage = tmp_path / "bad.tflite"
    garbage.write_bytes(b"not a flatbuffer at all")
    with pytest.raises(TFLiteGraphError, match="bad.tflite"):
        TFLiteGraph(garbage)


@pytest.mark.parametrize("runtime", ["litert", "torch"])
def test_finds_every_face_in_the_shared_clips(shared_clips, runtime):
    # MTCNN finds 123 faces in the 41 frames of the walking clip (3 people, every frame).
    detector = build_detector(BlazeFaceConfig(runtime=runtime))
    frames = decode_bgr_frames(shared_clips["face-demographics-walking-and-pause"])
    found = detect_frames(detector, frames, detection_size=640)
    assert [len(faces) for faces in found] == [3] * len(frames)
    for faces in found:
        for face in faces:
            assert face.score >= 0.5 and len(face.landmarks) == 6
            x1, y1, x2, y2 = face.box
            assert 20 < x2 - x1 < 120 and 20 < y2 - y1 < 120


def far_away(frame: np.ndarray, scale: float) -> np.ndarray:
    """The frame shrunk by ``scale`` into the top-left corner of a black frame of its size: the same people, further off."""
    height, width = frame.shape[:2]
    canvas = np.zeros_like(frame)
    canvas[: round(height * scale), : round(width * scale)] = cv2.resize(frame, (round(width * scale), round(height * scale)))
    return canvas


@pytest.mark.parametrize("runtime", ["litert", "torch"])
def test_tiles_find_the_faces_too_small_for_the_whole_frame_pass(shared_clips, runtime):
    frames = [far_away(frame, 1 / 3) for frame in decode_bgr_frames(shared_clips["face-demographics-walking-and-pause"])[::8]]
    whole_frame = build_detector(BlazeFaceConfig(runtime=runtime, model="full_range", min_face_size=8, tiles=(1, 1)))
    tiled = build_detector(BlazeFaceConfig(runtime=runtime, model="full_range", min_face_size=8, tiles=(2, 2)))
    # At a third of the size the three faces are ~7 model pixels in one 192 x 192 pass: none is found.
    assert sum(len(faces) for faces in detect_frames(whole_frame, frames, detection_size=640)) == 0
    found = detect_frames(tiled, frames, detection_size=640)
    assert [len(faces) for faces in found] == [3] * len(frames)
    for faces in found:
        for face in faces:
            x1, y1, x2, y2 = face.box
            assert x2 <= 640 and y2 <= 360 and 8 < x2 - x1 < 60  # in the shrunk corner, face-sized
    # The default (back on the frame, full_range on two tiles) loses at most one face in twenty here.
    default = build_detector(BlazeFaceConfig(runtime=runtime))
    assert sum(len(faces) for faces in detect_frames(default, frames, detection_size=640)) >= 0.95 * 3 * len(frames)


@pytest.mark.parametrize("shape", [(1, 1, 3), (40, 1920, 3), (1920, 40, 3), (2, 3, 3)])
@pytest.mark.parametrize("tiles", [(1, 1), (3, 2)])
def test_odd_frame_sizes_give_no_faces_and_no_error(shape, tiles):
    detector = BlazeFaceDetector(BlazeFaceConfig(tiles=tiles))
    assert detector.detect_batch([np.zeros(shape, np.uint8), np.full((64, 64, 3), 128, np.uint8)]) == [[], []]


def test_config_errors_name_the_field(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"detector\.blazeface\.model"):
        parse_config(PipelineConfig, {"detector": {"kind": "blazeface", "model": "huge"}}, "test")
    with pytest.raises(ConfigError, match="detector"):
        parse_config(PipelineConfig, {"detector": {"kind": "retinaface"}}, "test")
    with pytest.raises(FileNotFoundError, match="model_path"):
        BlazeFaceDetector(BlazeFaceConfig(model_path=tmp_path / "missing.tflite"))


def test_a_shifted_duplicate_from_another_tile_is_suppressed_but_a_neighbouring_face_is_kept():
    rows = np.zeros((3, 17), np.float32)
    rows[0, :5] = [101, 25, 121, 45, 0.8]
    rows[1, :5] = [90, 23, 112, 45, 0.5]  # the same face from another tile: IoU 0.33, but half of it inside the first
    rows[2, :5] = [125, 25, 145, 45, 0.7]  # the face next to it
    kept = suppress_contained(rows, 0.5)
    assert kept[:, 4].tolist() == pytest.approx([0.8, 0.7])
