import json
from collections.abc import Sequence

import numpy as np
import pytest

from pipeline import cli
from pipeline.checkpoint import default_checkpoint_path, load_checkpoint
from pipeline.detection import FaceDetection
from pipeline.training import calibrate_margin
from pipeline.training.calibrate_margin import (
    best_detection,
    calibrate,
    detection_frame,
    evenly_spaced,
    fitting_margin,
    main,
    parse_margins,
)
from tests.pipeline.conftest import make_metadata

PAD, UPSCALE = 4, 3


def square_image(side: int) -> np.ndarray:
    """48x48 black with a white centred square of ``side`` pixels."""
    image = np.zeros((48, 48), np.uint8)
    start = (48 - side) // 2
    image[start : start + side, start : start + side] = 255
    return image


class SquareDetector:
    """Finds the white square of a :func:`square_image` frame (score 0.99) between two low-scoring dark decoys.

    A frame without white pixels has no face. Records the frames it was given.
    """

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[list[FaceDetection]]:
        results = []
        for image in images:
            self.shapes.append(image.shape)
            ys, xs = np.nonzero(image[:, :, 0] > 127)
            if len(xs) == 0:
                results.append([])
                continue
            corner = PAD * UPSCALE
            decoy = FaceDetection(box=(corner, corner, corner + 8 * UPSCALE, corner + 8 * UPSCALE), score=0.5)
            face = FaceDetection(box=(float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)), score=0.99)
            results.append([decoy, face, FaceDetection(box=decoy.box, score=0.9)])
        return results


def bright_predictor(calls: list[int]):
    """Class 1 when most of a crop is white, else 0: a stand-in classifier whose answer depends on the crop's framing."""

    def predict(crops: list[np.ndarray]) -> np.ndarray:
        calls.append(len(crops))
        return np.array([int((crop > 127).mean() > 0.6) for crop in crops])

    return predict


def test_calibrate_scores_the_best_detection_per_margin_on_the_detected_subset():
    # White squares of side 20, 24, 30, 28 fill their boxes: the white fraction of a crop is 1 / (1 + 2m)^2,
    # i.e. 1.0, 0.69, 0.51, 0.39 for margins 0, 0.1, 0.2, 0.3, and 0.17-0.39 for the whole 48 px image.
    images = np.stack([square_image(20), square_image(24), square_image(30), square_image(28), np.zeros((48, 48), np.uint8)])
    labels = np.array([1, 1, 1, 0, 1])  # the last image has no face and must not count
    detector, calls = SquareDetector(), []
    result = calibrate(
        images,
        labels,
        detector,
        bright_predictor(calls),
        make_metadata(face_margin=0.15),
        margins=(0.3, 0.1, 0.0, 0.2),
        upscale=UPSCALE,
        pad=PAD,
        batch_size=2,
    )
    assert detector.shapes == [(168, 168, 3)] * 5  # (48 + 2 * 4) * 3, BGR
    assert (result["n"], result["detected"]) == (5, 4)
    assert list(result["per_margin"]) == ["0.0", "0.1", "0.2", "0.3"]
    accuracies = {margin: row["accuracy"] for margin, row in result["per_margin"].items()}
    assert accuracies == {"0.0": 0.75, "0.1": 0.75, "0.2": 0.25, "0.3": 0.25}
    assert all(row["n"] == 4 for row in result["per_margin"].values())
    assert result["best_margin"] == 0.0  # 0.0 and 0.1 tie: the smaller margin wins
    assert result["fer_framing_accuracy"] == 0.25  # whole images are mostly black: only the label-0 one is right
    assert result["median_box_side_px"] == pytest.approx(26.0)  # median of 20, 24, 30, 28 (not the 8 px decoys)
    assert result["fer_fit_margin"] == pytest.approx((48 / 26 - 1) / 2)
    assert calls == [4, 4, 4, 4, 4]  # four margins and the original framing, detected images only
    json.dumps(result)


def test_calibrate_picks_the_strict_maximum_and_handles_no_faces():
    images = np.stack([square_image(24)] * 2)
    result = calibrate(images, [0, 0], SquareDetector(), bright_predictor([]), make_metadata(), margins=(0.0, 0.3), upscale=3, pad=4)
    assert result["best_margin"] == 0.3  # label 0 is right only once the crop is mostly black
    assert result["per_margin"]["0.0"]["accuracy"] == 0.0 and result["per_margin"]["0.3"]["accuracy"] == 1.0

    calls: list[int] = []
    empty = calibrate(np.zeros((3, 48, 48), np.uint8), [1, 2, 3], SquareDetector(), bright_predictor(calls), make_metadata())
    assert (empty["n"], empty["detected"], empty["best_margin"], empty["median_box_side_px"]) == (3, 0, None, None)
    assert empty["fer_framing_accuracy"] is None and all(row["accuracy"] is None for row in empty["per_margin"].values())
    assert calls == []
    with pytest.raises(ValueError, match="2 images but 1 labels"):
        calibrate(images, [0], SquareDetector(), bright_predictor([]), make_metadata())


def test_helpers():
    image = (np.arange(48 * 48).reshape(48, 48) % 200 + 30).astype(np.uint8)
    frame = detection_frame(image, pad=2, upscale=3)
    assert frame.shape == (156, 156, 3) and frame.dtype == np.uint8
    assert (frame[:, :, 0] == frame[:, :, 2]).all()
    assert (frame[:6, :6] == image[0, 0]).all() and (frame[-6:, -6:] == image[-1, -1]).all()  # replicated border, upscaled
    assert best_detection([]) is None
    faces = [FaceDetection((0, 0, 1, 1), 0.8), FaceDetection((0, 0, 2, 2), 0.95), FaceDetection((0, 0, 3, 3), 0.95)]
    assert best_detection(faces) is faces[1]
    assert fitting_margin(48, 48) == 0.0 and fitting_margin(48, 40) == pytest.approx(0.1)
    assert evenly_spaced(10, 4).tolist() == [0, 3, 6, 9]
    assert evenly_spaced(10, None).tolist() == evenly_spaced(10, 20).tolist() == list(range(10))
    assert evenly_spaced(10, 1).tolist() == [0]
    assert len(set(evenly_spaced(3589, 3588).tolist())) == 3588
    assert parse_margins(" 0.2,0,-0.02 ,") == (-0.02, 0.0, 0.2)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--margins", "0,-0.5", "above -0.5"),
        ("--margins", "0,nan", "above -0.5"),
        ("--margins", "0.1,0.10", "margins repeat"),
        ("--margins", ",", "at least one margin"),
        ("--margins", "0,wide", "'wide' is not a number"),
        ("--upscale", "0", "must be at least 1"),
        ("--upscale", "2.5", "not an integer"),
        ("--pad", "-1", "must be at least 0"),
        ("--limit", "0", "must be at least 1"),
        ("--batch-size", "0", "must be at least 1"),
    ],
)
def test_cli_rejects_bad_arguments(tmp_path, capsys, option, value, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", str(tmp_path), option, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert option in err and message in err


def test_cli_reports_missing_inputs(tmp_path, tiny_data, capsys):
    assert main(["--data", str(tiny_data / "val"), "--model", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err
    assert main(["--data", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    config = tmp_path / "bad.yaml"
    config.write_text("detector: {kind: mtcnn, min_face_size: 2}\n")
    assert main(["--data", str(tiny_data / "val"), "--config", str(config)]) == 2
    assert "detector.mtcnn.min_face_size" in capsys.readouterr().err


class WholeImageDetector:
    """Stands in for build_detector(config): one face exactly over the original image of a default pad/upscale frame."""

    def __init__(self, config) -> None:
        self.config = config

    def detect_batch(self, images):
        offset = calibrate_margin.DEFAULT_PAD * calibrate_margin.DEFAULT_UPSCALE
        side = 48 * calibrate_margin.DEFAULT_UPSCALE
        return [[FaceDetection((offset, offset, offset + side, offset + side), 0.99)] for _ in images]


def test_ferstream_calibrate_margin_prints_one_json_object(tiny_data, tiny_checkpoint, monkeypatch, capsys):
    monkeypatch.setattr(calibrate_margin, "build_detector", WholeImageDetector)
    args = ["calibrate-margin", "--data", str(tiny_data / "val"), "--model", str(tiny_checkpoint), "--json", "--limit", "10"]
    assert cli.main([*args, "--margins", "0.1,0,-0.02"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["n"], result["detected"], result["limit"]) == (10, 10, 10)
    assert list(result["per_margin"]) == ["-0.02", "0.0", "0.1"] and result["margins"] == [-0.02, 0.0, 0.1]
    assert result["best_margin"] in (-0.02, 0.0, 0.1)
    assert result["median_box_side_px"] == 48.0 and result["fer_fit_margin"] == 0.0
    assert (result["model_id"], result["checkpoint_face_margin"], result["data_format"]) == ("tiny-test", 0.1, "imagefolder")
    assert (result["pad"], result["upscale"]) == (calibrate_margin.DEFAULT_PAD, calibrate_margin.DEFAULT_UPSCALE)
    detector = {"kind": "blazeface", "min_face_size": 12, "score_threshold": 0.5, "detection_size": 640, "face_margin": 0.1}
    assert result["detector"] == detector
    assert 0.0 <= result["fer_framing_accuracy"] <= 1.0
    # Deterministic: the same command prints the same object.
    assert cli.main([*args, "--margins", "0.1,0,-0.02"]) == 0
    assert json.loads(capsys.readouterr().out) == result
    # Without --json: a table for people.
    assert main(args[1:-3]) == 0
    out = capsys.readouterr().out
    assert "28 of 28 images with a face" in out and "dataset framing" in out


@pytest.mark.shared
def test_shipped_model_with_the_service_mtcnn_on_fer2013_val(shared_dir, capsys):
    val = shared_dir / "datasets" / "fer2013" / "val"
    if not val.is_dir():
        pytest.skip(f"FER2013 val split missing at {val}")
    assert main(["--data", str(val), "--limit", "14", "--json", "--no-cache"]) == 0
    result = json.loads(capsys.readouterr().out)
    _, metadata = load_checkpoint(default_checkpoint_path())
    assert result["model_id"] == metadata.model_id and result["n"] == 14
    # MODEL_CARD.md: MTCNN finds 86% of the val faces, with boxes about the whole 48 px image (49.7 px median).
    assert result["detected"] >= 9
    assert 44.0 <= result["median_box_side_px"] <= 56.0
    assert all(row["n"] == result["detected"] for row in result["per_margin"].values())
    assert result["best_margin"] in result["margins"]
