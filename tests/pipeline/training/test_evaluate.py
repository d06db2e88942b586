import json
import re
from pathlib import Path

import numpy as np
import pytest

from pipeline import cli
from pipeline.checkpoint import default_checkpoint_path, load_checkpoint
from pipeline.training.data import FER_CLASSES, load_image_folder
from pipeline.training.evaluate import confusion_matrix, evaluate, main, metrics_from_confusion
from tests.pipeline.training.conftest import pattern_csv

REPO_ROOT = Path(__file__).resolve().parents[3]
KEYS = {"n", "classes", "accuracy", "top5_accuracy", "per_class", "macro", "weighted", "confusion_matrix"}


def test_metrics_match_hand_computation():
    # rows true, cols predicted
    cm = np.array([[5, 1, 0], [2, 3, 1], [0, 0, 4]])
    m = metrics_from_confusion(cm, ["a", "b", "c"])
    assert m["n"] == 16 and m["accuracy"] == pytest.approx(12 / 16)
    a, b, c = (m["per_class"][k] for k in "abc")
    # a: tp 5, fn 1, fp 2, tn 8
    assert (a["precision"], a["recall"], a["specificity"], a["support"]) == pytest.approx((5 / 7, 5 / 6, 8 / 10, 6))
    assert a["f1"] == pytest.approx(2 * 5 / (2 * 5 + 1 + 2))
    # b: tp 3, fn 3, fp 1, tn 9
    assert (b["precision"], b["recall"], b["specificity"], b["f1"]) == pytest.approx((3 / 4, 3 / 6, 9 / 10, 6 / 10))
    # c: tp 4, fn 0, fp 1, tn 11
    assert (c["precision"], c["recall"], c["specificity"], c["f1"]) == pytest.approx((4 / 5, 1.0, 11 / 12, 8 / 9))
    assert m["macro"]["recall"] == pytest.approx((5 / 6 + 1 / 2 + 1) / 3)
    assert m["weighted"]["recall"] == pytest.approx(m["accuracy"])  # support-weighted recall is accuracy
    assert m["weighted"]["precision"] == pytest.approx((6 * 5 / 7 + 6 * 3 / 4 + 4 * 4 / 5) / 16)
    assert m["confusion_matrix"] == cm.tolist()


def test_absent_and_never_predicted_classes_score_zero_not_nan():
    cm = np.array([[3, 0], [0, 0]])  # class b: no samples, never predicted
    m = metrics_from_confusion(cm, ["a", "b"])
    assert m["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "specificity": 1.0, "support": 0}
    assert m["per_class"]["a"]["specificity"] == 0.0  # no negatives at all
    json.dumps(m)  # plain JSON types only


def test_confusion_matrix_counts_rows_true_cols_predicted():
    cm = confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 0, 2], 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    with pytest.raises(ValueError):
        confusion_matrix([0, 1], [0], 2)


def test_evaluate_reports_plain_and_tta_separately(tiny_data, tiny_checkpoint):
    model, meta = load_checkpoint(tiny_checkpoint)
    data = load_image_folder(tiny_data / "val")
    result = evaluate(model, meta, data.images, data.labels, tta=True)
    assert KEYS <= set(result) and KEYS <= set(result["tta"])
    assert result["n"] == result["tta"]["n"] == len(data)
    assert result["top5_accuracy"] >= result["accuracy"]
    assert "tta" not in evaluate(model, meta, data.images, data.labels, tta=False)


def test_eval_cli_prints_one_json_object_and_a_png(tiny_data, tiny_checkpoint, tmp_path, capsys):
    png = tmp_path / "cm.png"
    rc = main(["--data", str(tiny_data / "val"), "--model", str(tiny_checkpoint), "--tta", "--json", "--output", str(png)])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert KEYS <= set(result) and "tta" in result
    assert result["classes"] == list(FER_CLASSES) and result["model_id"] == "tiny-test"
    assert np.array(result["confusion_matrix"]).sum() == result["n"] == 28
    assert png.is_file() and png.stat().st_size > 1000
    # Default PNG location: next to the model.
    assert main(["--data", str(tiny_data / "val"), "--model", str(tiny_checkpoint)]) == 0
    assert (tiny_checkpoint.parent / "tiny_confusion.png").is_file()
    assert "top-1" in capsys.readouterr().out


def test_eval_cli_errors(tmp_path, tiny_data, capsys):
    assert main(["--data", str(tiny_data / "val"), "--model", str(tmp_path / "missing.pt"), "--no-plot"]) == 2
    assert "missing.pt" in capsys.readouterr().err


def test_ferstream_eval_on_fer2013_csv_splits(tmp_path, tiny_checkpoint, capsys):
    csv_path = pattern_csv(tmp_path / "fer2013.csv", {"Training": 2, "PublicTest": 3, "PrivateTest": 1})
    common = ["--model", str(tiny_checkpoint), "--json", "--no-plot"]
    assert cli.main(["eval", "--data", str(csv_path), "--data-format", "fer2013-csv", *common]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 21 and (result["data_format"], result["data_split"]) == ("fer2013-csv", "PublicTest")
    assert result["per_class"]["happy"]["support"] == 3
    assert cli.main(["eval", "--data", str(csv_path), "--split", "PrivateTest", *common]) == 0  # auto-detected CSV
    assert json.loads(capsys.readouterr().out)["n"] == 7
    assert cli.main(["eval", "--data", str(csv_path), "--data-format", "ferplus", *common]) == 2
    assert "--ferplus-csv" in capsys.readouterr().err
    assert cli.main(["eval", "--data", str(csv_path), "--split", "Validation", *common]) == 2
    assert "unknown Usage ['Validation']" in capsys.readouterr().err


@pytest.mark.shared
def test_shipped_model_reproduces_model_card(shared_dir):
    val = shared_dir / "datasets" / "fer2013" / "val"
    if not val.is_dir():
        pytest.skip(f"FER2013 val split missing at {val}")
    card = (REPO_ROOT / "MODEL_CARD.md").read_text()
    match = re.search(r"ferstream-eval-accuracy:\s*([0-9.]+)", card)
    assert match, "MODEL_CARD.md states the shipped model's val accuracy (ferstream-eval-accuracy: NN.NN)"
    model, meta = load_checkpoint(default_checkpoint_path())
    data = load_image_folder(val, image_size=meta.resize_to)
    result = evaluate(model, meta, data.images, data.labels, tta=False)
    assert result["n"] == 3589
    assert abs(100 * result["accuracy"] - float(match.group(1))) <= 0.1
