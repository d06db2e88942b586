from pathlib import Path

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
    letterbox,
    ssd_anchors,
    to_detections,
    weighted_nms,
)
from pipeline.detectors.tflite_graph import TFLiteGraph, TFLiteGraphError
from tests.pipeline.test_detection import decode_bgr_frames


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
    (detection,) = to_detections(row[None], placement, min_face_size=10)
    assert detection.box == pytest.approx((50.0, 0.0, 100.0, 50.0))
    assert detection.landmarks[0] == pytest.approx((60.0, 10.0))  # eyes in image order
    assert to_detections(row[None], placement, min_face_size=60) == []


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


@pytest.mark.parametrize("shape", [(1, 1, 3), (40, 1920, 3), (1920, 40, 3), (2, 3, 3)])
def test_odd_frame_sizes_give_no_faces_and_no_error(blazeface, shape):
    assert blazeface.detect_batch([np.zeros(shape, np.uint8), np.full((64, 64, 3), 128, np.uint8)]) == [[], []]


def test_config_errors_name_the_field(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"detector\.blazeface\.model"):
        parse_config(PipelineConfig, {"detector": {"kind": "blazeface", "model": "huge"}}, "test")
    with pytest.raises(ConfigError, match="detector"):
        parse_config(PipelineConfig, {"detector": {"kind": "retinaface"}}, "test")
    with pytest.raises(FileNotFoundError, match="model_path"):
        BlazeFaceDetector(BlazeFaceConfig(model_path=tmp_path / "missing.tflite"))
