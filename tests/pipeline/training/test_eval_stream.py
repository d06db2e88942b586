import json
import time
from collections.abc import Sequence

import numpy as np
import pytest

from pipeline import cli
from pipeline.detection import FaceDetection
from pipeline.training import eval_stream
from pipeline.training.eval_stream import (
    background,
    box_iou,
    encode_decode,
    evaluate_stream,
    grid_layout,
    main,
    match_faces,
    render_frame,
    score,
)
from tests.pipeline.conftest import make_metadata


def test_grid_layout_fits_the_frame_without_touching_boxes():
    for size in eval_stream.DEFAULT_SIZES:
        layout = grid_layout(size, 640, 360)
        assert layout.boxes, size
        for x1, y1, x2, y2 in layout.boxes:
            assert (x2 - x1, y2 - y1) == (size, size)
            assert 0 <= x1 and x2 <= 640 and 0 <= y1 and y2 <= 360
        for a in layout.boxes:
            for b in layout.boxes:
                assert a == b or box_iou(a, b) == 0.0
    assert len(grid_layout(24, 640, 360).boxes) == 17 * 10  # cells of 24 + 12 px
    assert len(grid_layout(200, 640, 360).boxes) == 2
    with pytest.raises(ValueError, match="does not fit"):
        grid_layout(400, 640, 360)


def test_match_faces_needs_the_centre_inside_and_uses_each_detection_once():
    pasted = [(0.0, 0.0, 10.0, 10.0), (20.0, 0.0, 30.0, 10.0), (40.0, 0.0, 50.0, 10.0)]
    near = FaceDetection((1.0, 1.0, 11.0, 11.0), 0.9)  # centre (6, 6): inside the first box
    loose = FaceDetection((-2.0, -2.0, 14.0, 14.0), 0.9)  # also inside the first, lower IoU
    off = FaceDetection((26.0, 0.0, 36.0, 10.0), 0.9)  # centre x 31: outside the second box
    assert match_faces(pasted, [loose, near, off]) == [near, None, None]
    assert match_faces(pasted, [loose]) == [loose, None, None]
    assert match_faces(pasted, []) == [None, None, None]
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(1 / 3)


def test_score_counts_misses_apart_from_accuracy():
    classes = ("angry", "sad", "neutral")
    labels = np.array([0, 1, 1, 2, 2])
    found = np.array([True, True, False, True, True])
    predictions = np.array([0, 1, 1, 2])  # for labels 0, 1, 2, 2
    result = score(labels, found, predictions, classes)
    assert (result["n"], result["found"], result["detection_rate"]) == (5, 4, 0.8)
    assert result["accuracy"] == 0.75
    assert result["recall"] == {"angry": 1.0, "sad": 1.0, "neutral": 0.5}
    assert (result["sad_precision"], result["called_sad"]) == (0.5, 2)
    empty = score(labels, np.zeros(5, bool), np.zeros(0, np.int64), classes)
    assert empty["accuracy"] is None and empty["sad_precision"] is None and empty["recall"]["sad"] is None


def test_encode_decode_round_trips_frames_through_h264():
    base = background(160, 96)
    layout = grid_layout(48, 160, 96)
    face = np.tile(np.linspace(20, 235, 48, dtype=np.uint8), (48, 1))
    frames = [render_frame(base, [face, 255 - face], layout), render_frame(base, [255 - face], layout)]
    decoded = encode_decode(frames, kbps=2000, gop=4, hold=3)
    assert len(decoded) == 2 and decoded[0].shape == (96, 160, 3) and decoded[0].dtype == np.uint8
    for original, back in zip(frames, decoded, strict=True):
        assert np.abs(original.astype(int) - back.astype(int)).mean() < 6  # close, but coded
    # A lower bitrate loses more of the picture.
    coarse = encode_decode(frames, kbps=20, gop=4, hold=3)
    assert np.abs(frames[0].astype(int) - coarse[0].astype(int)).mean() > np.abs(frames[0].astype(int) - decoded[0].astype(int)).mean()
    assert encode_decode([], 500, 30, 2) == []


class BrightSquareDetector:
    """Finds each bright square in a frame (a face pasted as all-255) by connected components: a real frame search."""

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[list[FaceDetection]]:
        import cv2

        results = []
        for image in images:
            count, _, stats, _ = cv2.connectedComponentsWithStats((image[:, :, 0] > 200).astype(np.uint8))
            results.append(
                [FaceDetection((float(x), float(y), float(x + w), float(y + h)), 0.99) for x, y, w, h, area in stats[1:count] if area > 50]
            )
        return results


def test_evaluate_stream_on_faces_a_detector_can_and_cannot_find():
    # Label 1 faces are white (found), label 0 faces are black (missed); the stand-in classifier calls every crop class 1.
    images = np.stack([np.full((48, 48), 255 if i % 2 else 0, np.uint8) for i in range(6)])
    labels = np.array([i % 2 for i in range(6)])

    def predict(crops: list[np.ndarray]) -> np.ndarray:
        probabilities = np.zeros((len(crops), 7), np.float32)
        probabilities[:, 1] = 1.0
        return probabilities

    result = evaluate_stream(
        images, labels, BrightSquareDetector(), predict, make_metadata(), 0.1, sizes=(32, 64), bitrates=(1000,), width=320, height=192
    )
    assert list(result["per_condition"]) == ["32px@1000", "64px@1000"]
    for key in ("32px@1000", "64px@1000"):
        row = result["per_condition"][key]
        assert (row["n"], row["found"], row["accuracy"]) == (6, 3, 1.0)
    assert result["per_size"]["64"]["detection_rate"] == 0.5
    assert result["per_bitrate"]["1000"]["n"] == 12
    assert result["clean"]["accuracy"] == 0.5  # every image, found or not
    assert result["target"]["accuracy"] == 1.0 and result["target"]["accuracy_gap_to_clean"] == -0.5
    assert result["target"]["clean_accuracy_of_found"] == 1.0  # the found faces are the label-1 ones, right when clean too
    assert result["target"]["accuracy_gap_to_clean_of_found"] == 0.0
    json.dumps(result)


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    for option, value, message in [("--sizes", "0,48", "at least 1"), ("--bitrates", "fast", "integers"), ("--limit", "0", "at least 1")]:
        with pytest.raises(SystemExit):
            main(["--data", str(tmp_path), option, value])
        err = capsys.readouterr().err
        assert option in err and message in err
    assert main(["--data", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err


@pytest.mark.shared
def test_eval_stream_on_fer2013_val_with_the_service_detector(shared_dir, tmp_path, capsys):
    val = shared_dir / "datasets" / "fer2013" / "val"
    if not val.is_dir():
        pytest.skip(f"FER2013 val split missing at {val}")
    started = time.monotonic()
    out, plot = tmp_path / "stream.json", tmp_path / "stream.png"
    args = ["eval-stream", "--data", str(val), "--limit", "14", "--sizes", "32,128", "--bitrates", "1000", "--no-cache"]
    assert cli.main([*args, "--json", str(out), "--plot", str(plot)]) == 0
    assert time.monotonic() - started < 30
    result = json.loads(out.read_text())
    assert result["n"] == 14 and result["sizes"] == [32, 128] and result["bitrates_kbps"] == [1000]
    assert set(result) >= {"clean", "per_condition", "per_size", "per_bitrate", "target", "detector", "model_id", "margin"}
    large = result["per_condition"]["128px@1000"]
    assert large["detection_rate"] > 0.5  # a 128 px face at 1 Mbit/s is easy to find
    for row in result["per_condition"].values():
        assert 0.0 <= row["detection_rate"] <= 1.0
        assert row["accuracy"] is None or 0.0 <= row["accuracy"] <= 1.0
    assert 0.0 <= result["clean"]["accuracy"] <= 1.0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "target (>= 48 px" in capsys.readouterr().out
