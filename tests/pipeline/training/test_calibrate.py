import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline import cli
from pipeline.architectures import ProbabilityEnsemble, build_model
from pipeline.checkpoint import load_checkpoint
from pipeline.training.calibrate import fit_temperature, fold_temperature
from pipeline.training.data import load_image_folder
from pipeline.training.evaluate import evaluate, expected_calibration_error, reliability_bins
from pipeline.training.evaluate import main as eval_main


def test_ece_of_hand_made_predictions() -> None:
    # Two faces at confidence 0.9 (one right), two at 0.6 (both right): |0.5-0.9|/2 + |1.0-0.6|/2 = 0.4.
    probabilities = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6], [0.4, 0.6]])
    labels = np.array([0, 1, 1, 1])
    assert expected_calibration_error(probabilities, labels, bins=10) == pytest.approx(0.4)
    rows = reliability_bins(probabilities, labels, bins=10)
    assert [row["count"] for row in rows] == [0, 0, 0, 0, 0, 2, 0, 0, 2, 0]
    assert expected_calibration_error(np.array([[1.0, 0.0]]), np.array([0])) == 0.0  # confidence 1 lands in the last bin


def test_fitted_temperature_recovers_the_one_that_made_the_logits_overconfident() -> None:
    torch.manual_seed(0)
    true_logits = torch.randn(4000, 5) * 2
    labels = torch.distributions.Categorical(logits=true_logits).sample()
    t = fit_temperature(true_logits * 3.0, labels)
    assert t == pytest.approx(3.0, rel=0.1)
    assert F.cross_entropy(true_logits * 3.0 / t, labels) < F.cross_entropy(true_logits * 3.0, labels)


def test_folding_divides_the_logits_of_a_plain_network_and_of_an_ensemble() -> None:
    torch.manual_seed(0)
    inputs = torch.randn(3, 1, 44, 44)
    model = build_model("tiny", 7).eval()
    member = {"arch": "tiny", "arch_kwargs": {}, "mean": [0.0], "std": [1.0]}
    ensemble = ProbabilityEnsemble(7, [member, member], weights=[1.0, 1.0]).eval()
    with torch.no_grad():
        for network in (model, ensemble):
            before = network(inputs)
            fold_temperature(network, 2.0, 7)
            assert torch.allclose(network(inputs), before / 2.0, atol=1e-5)
            assert torch.equal(network(inputs).argmax(1), before.argmax(1))
    assert float(ensemble.temperature) == 2.0
    with pytest.raises(ValueError):
        fold_temperature(model, 0.0, 7)


def test_ferstream_calibrate_then_eval_reports_the_recorded_ece_and_draws_the_reliability_diagram(
    tiny_data, tiny_checkpoint, tmp_path, capsys
):
    out = tmp_path / "cal.pt"
    assert cli.main(["calibrate", str(tiny_checkpoint), "--data", str(tiny_data / "val"), "--output", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["after"]["nll"] <= report["before"]["nll"] + 1e-6
    assert report["after"]["accuracy"] == report["before"]["accuracy"]
    calibrated, metadata = load_checkpoint(out)
    assert metadata.model_id == f"tiny-test-t{report['temperature']:.2f}"
    assert metadata.metrics["calibration"]["temperature"] == report["temperature"]
    val = load_image_folder(tiny_data / "val")
    measured = evaluate(calibrated, metadata, val.images, val.labels, tta=False)
    assert measured["ece"] == pytest.approx(report["after"]["ece"]) == pytest.approx(metadata.metrics["ece"])

    png = tmp_path / "plots" / "cal_confusion.png"
    assert eval_main(["--data", str(tiny_data / "val"), "--model", str(out), "--json", "--output", str(png)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ece"] == pytest.approx(report["after"]["ece"]) and result["nll"] == pytest.approx(report["after"]["nll"])
    assert result["reliability_png"] == str(tmp_path / "plots" / "cal_reliability.png")
    assert (tmp_path / "plots" / "cal_reliability.png").stat().st_size > 1000 and png.is_file()
