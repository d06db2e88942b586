import json

import numpy as np
import pytest
import torch

from pipeline import cli
from pipeline.architectures import ProbabilityEnsemble, build_model
from pipeline.checkpoint import ModelMetadata, load_checkpoint, preprocess_crops, save_checkpoint
from pipeline.classification import ExpressionClassifier
from pipeline.config import ClassifierConfig
from pipeline.runtimes.onnx_runtime import load_onnx
from pipeline.training.data import FER_CLASSES, load_image_folder
from pipeline.training.ensemble import greedy_selection, mixed_probabilities, negative_log_likelihood
from pipeline.training.evaluate import evaluate, predict_probabilities
from pipeline.training.export import main as export_main


def one_hot_probabilities(predictions: list[int], k: int = 3, confidence: float = 0.8) -> np.ndarray:
    p = np.full((len(predictions), k), (1 - confidence) / (k - 1))
    p[np.arange(len(predictions)), predictions] = confidence
    return p


def test_greedy_selection_prefers_the_better_member_and_combines_complementary_ones() -> None:
    labels = np.array([0, 1, 2, 0, 1, 2])
    good = one_hot_probabilities([0, 1, 2, 0, 1, 0])
    bad = one_hot_probabilities([1, 2, 0, 1, 2, 0])
    counts = greedy_selection([bad, good], labels, rounds=5, metric="accuracy")
    assert counts == [0, 5]
    # Each member is right on a different half: with replacement, the mix beats either member alone.
    left = one_hot_probabilities([0, 1, 2, 1, 2, 0], confidence=0.6)
    right = one_hot_probabilities([1, 2, 0, 0, 1, 2], confidence=0.6)
    counts = greedy_selection([left, right], labels, rounds=4, metric="nll")
    assert sum(counts) == 4 and min(counts) >= 1
    mixed = mixed_probabilities([left, right], counts)
    assert negative_log_likelihood(mixed, labels) < min(negative_log_likelihood(p, labels) for p in (left, right))
    with pytest.raises(ValueError):
        greedy_selection([], labels)


def test_ensemble_output_is_the_weighted_probability_average_with_each_members_normalization() -> None:
    torch.manual_seed(0)
    a, b = build_model("tiny", 7).eval(), build_model("tiny", 7).eval()
    members = [
        {"arch": "tiny", "arch_kwargs": {}, "mean": [0.5], "std": [0.3]},
        {"arch": "tiny", "arch_kwargs": {}, "mean": [0.4], "std": [0.25]},
    ]
    ensemble = ProbabilityEnsemble(7, members, weights=[3.0, 1.0], mean=[0.5], std=[0.3]).eval()
    ensemble.members[0].load_state_dict(a.state_dict())
    ensemble.members[1].load_state_dict(b.state_dict())
    raw = torch.rand(4, 1, 44, 44)
    with torch.no_grad():
        expected = 0.75 * torch.softmax(a((raw - 0.5) / 0.3), 1) + 0.25 * torch.softmax(b((raw - 0.4) / 0.25), 1)
        assert torch.allclose(torch.softmax(ensemble((raw - 0.5) / 0.3), 1), expected, atol=1e-6)
        # Training code moves models (a distillation teacher included) to channels_last.
        fast = ensemble.to(memory_format=torch.channels_last)
        assert torch.allclose(
            torch.softmax(fast(((raw - 0.5) / 0.3).contiguous(memory_format=torch.channels_last)), 1), expected, atol=1e-5
        )
    with pytest.raises(ValueError, match="weights"):
        ProbabilityEnsemble(7, members, weights=[1.0])


def member_checkpoint(path, seed: int, mean: float, std: float):
    torch.manual_seed(seed)
    meta = ModelMetadata(f"member-{seed}", "tiny", {}, FER_CLASSES, 44, 48, True, (mean,), (std,), 0.1, {})
    save_checkpoint(path, build_model("tiny", 7), meta)
    return path


def test_ferstream_ensemble_writes_one_model_file_that_eval_and_onnx_export_run(tiny_data, tmp_path, capsys):
    paths = [member_checkpoint(tmp_path / f"m{i}.pt", i, mean, std) for i, (mean, std) in enumerate([(0.5, 0.3), (0.45, 0.28)])]
    out = tmp_path / "ens" / "ensemble.pt"
    assert cli.main(["ensemble", *map(str, paths), "--data", str(tiny_data / "val"), "--output", str(out), "--rounds", "6"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["selection"]["counts"]) == 2 and sum(report["selection"]["counts"]) == 6
    assert report["weights"] == [c / 6 for c in report["selection"]["counts"]]

    model, metadata = load_checkpoint(out)
    assert metadata.arch == "ensemble" and metadata.model_id == "ensemble"
    assert [m["model_id"] for m in metadata.metrics["ensemble_members"]] == [
        f"member-{i}" for i, c in enumerate(report["selection"]["counts"]) if c > 0
    ]
    val = load_image_folder(tiny_data / "val")
    measured = evaluate(model, metadata, val.images, val.labels, tta=False)
    assert measured["accuracy"] == pytest.approx(metadata.metrics["accuracy"]) == pytest.approx(report["accuracy"])
    # The file's output equals the selection's weighted average of the members' own probabilities.
    member_probabilities = [predict_probabilities(*load_checkpoint(p), val.images) for p in paths]
    expected = mixed_probabilities(member_probabilities, report["weights"])
    assert np.allclose(predict_probabilities(model, metadata, val.images), expected, atol=1e-5)

    onnx_path = tmp_path / "ens" / "ensemble.onnx"
    assert export_main(["--format", "onnx", "--model", str(out), "--output", str(onnx_path)]) == 0
    session, onnx_metadata = load_onnx(onnx_path)
    inputs = preprocess_crops(list(val.images[:5]), onnx_metadata)
    with torch.no_grad():
        reference = model(inputs).numpy()
    assert np.allclose(session.run(None, {"faces": inputs.numpy()})[0], reference, atol=1e-4)


def test_hand_given_weights_and_bad_input_are_reported(tiny_data, tmp_path, capsys):
    paths = [member_checkpoint(tmp_path / f"m{i}.pt", i, 0.5, 0.3) for i in range(2)]
    out = tmp_path / "ens.pt"
    base = ["ensemble", *map(str, paths), "--data", str(tiny_data / "val"), "--output", str(out)]
    assert cli.main([*base, "--weights", "1,0"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["weights"] == [1.0, 0.0] and report["selection"]["method"] == "given"
    model, metadata = load_checkpoint(out)
    assert len(model.members) == 1  # a weight-0 member is left out of the file
    assert cli.main([*base, "--weights", "1"]) == 2
    assert "--weights has 1 values for 2 models" in capsys.readouterr().err
    odd = tmp_path / "odd.pt"
    save_checkpoint(odd, build_model("tiny", 7), ModelMetadata("odd", "tiny", {}, FER_CLASSES, 40, 48, True, (0.5,), (0.3,), 0.1, {}))
    assert cli.main(["ensemble", str(paths[0]), str(odd), "--data", str(tiny_data / "val"), "--output", str(out)]) == 2
    assert "input_size 40 differs" in capsys.readouterr().err


def test_the_service_classifier_runs_a_calibrated_ensemble_file(tiny_data, tmp_path, capsys):
    paths = [member_checkpoint(tmp_path / f"m{i}.pt", i, 0.5, 0.3) for i in range(2)]
    out = tmp_path / "ens.pt"
    assert cli.main(["ensemble", *map(str, paths), "--data", str(tiny_data / "val"), "--output", str(out), "--weights", "2,1"]) == 0
    assert cli.main(["calibrate", str(out), "--data", str(tiny_data / "val")]) == 0
    temperature = [json.loads(line) for line in capsys.readouterr().out.splitlines()][-1]["temperature"]
    calibrated = tmp_path / "ens-cal.pt"
    val = load_image_folder(tiny_data / "val")
    crops = list(val.images[:6])
    member_probabilities = [predict_probabilities(*load_checkpoint(p), crops) for p in paths]
    expected_log = np.log(mixed_probabilities(member_probabilities, [2, 1])) / temperature
    expected = np.exp(expected_log) / np.exp(expected_log).sum(1, keepdims=True)
    for backend, model_file in (("torch", calibrated), ("onnxruntime", tmp_path / "ens-cal.onnx")):
        if backend == "onnxruntime":
            assert export_main(["--format", "onnx", "--model", str(calibrated), "--output", str(model_file)]) == 0
        classifier = ExpressionClassifier(ClassifierConfig(backend=backend, checkpoint=model_file))
        assert classifier.model_id == f"ens-t{temperature:.2f}"
        assert np.allclose(classifier.predict(crops), expected, atol=1e-5), backend
