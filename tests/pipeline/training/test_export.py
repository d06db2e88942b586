import json

import numpy as np
import onnx
import pytest
import torch

from pipeline.architectures import build_model
from pipeline.checkpoint import (
    ONNX_INPUT,
    ONNX_METADATA_KEY,
    ONNX_OUTPUT,
    ModelMetadata,
    default_checkpoint_path,
    load_checkpoint,
    preprocess_crops,
    save_checkpoint,
)
from pipeline.runtimes.onnx_runtime import load_onnx
from pipeline.training import export as export_module
from pipeline.training.data import FER_CLASSES
from pipeline.training.export import load_torchscript, main

# The stated parity tolerance of an export (README, MODEL_CARD): max |logit| difference to PyTorch.
LOGIT_TOLERANCE = 1e-4


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    meta = ModelMetadata("export-test", "tiny", {}, FER_CLASSES, 44, 48, True, (0.5,), (0.3,), 0.1, {"accuracy": 0.1})
    path = tmp_path / "m.pt"
    save_checkpoint(path, build_model("tiny", 7), meta)
    return path


def test_torchscript_export_matches_checkpoint_and_carries_metadata(checkpoint, tmp_path, capsys):
    out = tmp_path / "exported" / "m.ts"
    assert main(["--format", "torchscript", "--model", str(checkpoint), "--output", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parity_max_abs_logit_diff"] < 1e-4 and report["parity_same_argmax"]
    module, meta = load_torchscript(out)
    model, original = load_checkpoint(checkpoint)
    assert meta == original
    assert json.loads((tmp_path / "exported" / "m.ts.json").read_text())["model_id"] == "export-test"
    # Another batch size than the trace's: the batch axis stays free.
    crops = [np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8) for _ in range(5)]
    inputs = preprocess_crops(crops, meta)
    with torch.no_grad():
        torch.testing.assert_close(module(inputs), model(inputs), atol=1e-5, rtol=1e-5)


def test_default_output_sits_next_to_the_model(checkpoint):
    assert main(["--format", "torchscript", "--model", str(checkpoint)]) == 0
    assert checkpoint.with_name("m.torchscript.pt").is_file()


def mixed_crops(n: int, seed: int) -> list[np.ndarray]:
    """Gray and BGR uint8 crops of assorted sizes (smaller and larger than the model's 48 px)."""
    rng = np.random.default_rng(seed)
    crops = []
    for i in range(n):
        side = int(rng.integers(20, 160))
        crops.append(rng.integers(0, 256, (side, side) if i % 2 else (side, side, 3), dtype=np.uint8))
    return crops


def assert_onnx_matches_checkpoint(checkpoint, out, capsys):
    assert main(["--format", "onnx", "--model", str(checkpoint), "--output", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["parity_tolerance"] == LOGIT_TOLERANCE
    assert report["parity_max_abs_logit_diff"] < LOGIT_TOLERANCE and report["parity_same_argmax"]
    model, original = load_checkpoint(checkpoint)
    session, meta = load_onnx(out)
    assert meta == original
    props = {entry.key: entry.value for entry in onnx.load(str(out)).metadata_props}
    assert json.loads(props[ONNX_METADATA_KEY]) == original.to_dict()
    assert json.loads(out.with_name(out.name + ".json").read_text()) == original.to_dict()
    assert session.get_inputs()[0].shape[1:] == [original.channels, original.input_size, original.input_size]
    # Independently of the exporter's own check: other crops, a batch size the export never saw.
    inputs = preprocess_crops(mixed_crops(37, seed=3), original)
    with torch.no_grad():
        reference = model(inputs).numpy()
    (exported,) = session.run([ONNX_OUTPUT], {ONNX_INPUT: inputs.numpy()})
    diff = float(np.abs(exported - reference).max())
    assert diff < LOGIT_TOLERANCE, f"max |logit diff| {diff:.2e}"
    np.testing.assert_array_equal(exported.argmax(1), reference.argmax(1))
    return report, diff


def test_onnx_export_matches_checkpoint_within_tolerance(checkpoint, tmp_path, capsys):
    _, diff = assert_onnx_matches_checkpoint(checkpoint, tmp_path / "exported" / "m.onnx", capsys)
    print(f"tiny checkpoint: max |logit diff| {diff:.2e}")


def test_onnx_export_of_the_shipped_model_matches_within_tolerance(tmp_path, capsys):
    report, diff = assert_onnx_matches_checkpoint(default_checkpoint_path(), tmp_path / "expression_default.onnx", capsys)
    assert report["model_id"] == load_checkpoint(default_checkpoint_path())[1].model_id
    print(f"shipped checkpoint: max |logit diff| {diff:.2e} (export report {report['parity_max_abs_logit_diff']:.2e})")


def test_export_fails_when_the_exported_model_drifts(checkpoint, tmp_path, capsys, monkeypatch):
    exported_logits = export_module._exported_logits

    def drifted(fmt, path, inputs):
        return exported_logits(fmt, path, inputs) + 2 * LOGIT_TOLERANCE

    monkeypatch.setattr(export_module, "_exported_logits", drifted)
    assert main(["--format", "onnx", "--model", str(checkpoint), "--output", str(tmp_path / "m.onnx")]) == 2
    assert "differs from the checkpoint" in capsys.readouterr().err


def test_missing_checkpoint_is_an_error(tmp_path, capsys):
    assert main(["--format", "torchscript", "--model", str(tmp_path / "nope.pt")]) == 2
    assert "nope.pt" in capsys.readouterr().err
