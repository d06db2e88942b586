import json

import numpy as np
import pytest
import torch

from pipeline import cli
from pipeline.architectures import build_model
from pipeline.checkpoint import CheckpointError, load_checkpoint
from pipeline.training.data import FER_CLASSES, load_image_folder
from pipeline.training.evaluate import evaluate, predict_probabilities
from pipeline.training.logit_adjust import choose_tau, final_linear, fold_adjustment, log_priors, main, sweep

CLASSES = ("common", "middle", "rare")


def test_log_priors_are_log_frequencies_and_need_every_class() -> None:
    assert np.allclose(log_priors([6, 3, 1]), np.log([0.6, 0.3, 0.1]))
    with pytest.raises(ValueError, match="every class"):
        log_priors([5, 0, 1])


def test_sweep_recovers_an_under_predicted_rare_class() -> None:
    # Two rare-class faces the model scores just below "common": the prior correction flips them.
    probabilities = np.array([[0.5, 0.1, 0.4], [0.5, 0.1, 0.4], [0.9, 0.05, 0.05], [0.1, 0.8, 0.1]])
    labels = np.array([2, 2, 0, 1])
    rows = sweep(probabilities, labels, log_priors([8, 3, 1]), [0.0, 1.0], CLASSES)
    assert [row["tau"] for row in rows] == [0.0, 1.0]
    assert rows[0]["recall"]["rare"] == 0.0 and rows[0]["accuracy"] == 0.5
    assert rows[1]["recall"]["rare"] == 1.0 and rows[1]["accuracy"] == 1.0  # log(0.4/0.5) > log(1/12) - log(8/12)


def row(tau: float, accuracy: float, recalls: tuple[float, ...]) -> dict:
    return {"tau": tau, "accuracy": accuracy, "macro_f1": 0.0, "recall": dict(zip(CLASSES, recalls, strict=True))}


def test_choose_tau_prefers_accuracy_among_rows_meeting_the_recall_floor() -> None:
    rows = [
        row(0.0, 0.70, (0.9, 0.8, 0.2)),
        row(0.25, 0.66, (0.8, 0.7, 0.4)),
        row(0.5, 0.68, (0.8, 0.7, 0.36)),
        row(1.0, 0.68, (0.7, 0.6, 0.9)),
    ]
    assert choose_tau(rows, 0.35)["tau"] == 0.5  # best accuracy that qualifies; ties go to the smaller tau
    assert choose_tau(rows, 0.95)["tau"] == 1.0  # nothing qualifies: the highest smallest recall
    with pytest.raises(ValueError):
        choose_tau([], 0.35)


def test_folding_into_the_final_layer_shifts_the_logits_exactly() -> None:
    torch.manual_seed(0)
    model = build_model("tiny", 7).eval()
    inputs = torch.randn(5, 1, 44, 44)
    log_prior = log_priors(np.arange(1, 8))
    with torch.no_grad():
        before = model(inputs)
        fold_adjustment(model, log_prior, 0.5)
        after = model(inputs)
    assert torch.allclose(after, before - 0.5 * torch.as_tensor(log_prior, dtype=torch.float32), atol=1e-5)


def test_a_model_without_a_class_layer_is_refused() -> None:
    with pytest.raises(CheckpointError, match="final nn.Linear"):
        final_linear(torch.nn.Sequential(torch.nn.Linear(4, 3, bias=False)), 3)


def test_ferstream_adjust_logits_writes_a_checkpoint_whose_val_metrics_match_the_chosen_row(tiny_data, tiny_checkpoint, tmp_path, capsys):
    output = tmp_path / "adjusted.pt"
    args = ["adjust-logits", "--model", str(tiny_checkpoint), "--train-data", str(tiny_data / "train"), "--data", str(tiny_data / "val")]
    assert cli.main([*args, "--taus", "0,0.5,1", "--output", str(output)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [row["tau"] for row in report["sweep"]] == [0.0, 0.5, 1.0]

    model, metadata = load_checkpoint(output)
    tau = report["chosen"]["tau"]
    assert metadata.model_id == f"tiny-test-la{tau:g}" == report["model_id"]
    adjustment = metadata.metrics["logit_adjustment"]
    assert adjustment["tau"] == tau and adjustment["train_class_counts"] == [12] * len(FER_CLASSES)
    val = load_image_folder(tiny_data / "val")
    measured = evaluate(model, metadata, val.images, val.labels, tta=False)
    assert measured["accuracy"] == pytest.approx(report["chosen"]["accuracy"]) == pytest.approx(metadata.metrics["accuracy"])
    assert measured["confusion_matrix"] == metadata.metrics["confusion_matrix"]
    # Balanced priors (12 per class) shift every logit by the same amount: predictions do not change.
    original, original_metadata = load_checkpoint(tiny_checkpoint)
    with torch.no_grad():
        same = predict_probabilities(original, original_metadata, val.images).argmax(1)
        adjusted = predict_probabilities(model, metadata, val.images).argmax(1)
    assert (same == adjusted).all()


def test_adjust_logits_errors_name_the_problem(tiny_data, tmp_path, capsys):
    missing = tmp_path / "missing.pt"
    assert (
        main(["--model", str(missing), "--train-data", str(tiny_data / "train"), "--data", str(tiny_data / "val"), "--output", "x.pt"]) == 2
    )
    assert "missing.pt" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", "m.pt", "--train-data", "t", "--data", "v", "--output", "o.pt", "--taus", "-1"])
