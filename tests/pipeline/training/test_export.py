import importlib.util
import json

import numpy as np
import pytest
import torch

from pipeline.architectures import build_model
from pipeline.checkpoint import ModelMetadata, load_checkpoint, preprocess_crops, save_checkpoint
from pipeline.training.data import FER_CLASSES
from pipeline.training.export import load_torchscript, main


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


def test_onnx_export_or_clear_missing_dependency(checkpoint, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    rc = main(["--format", "onnx", "--model", str(checkpoint), "--output", str(out)])
    if importlib.util.find_spec("onnx") is None:
        assert rc == 2 and "pip install onnx" in capsys.readouterr().err
        return
    assert rc == 0 and out.is_file()
    report = json.loads(capsys.readouterr().out)
    if importlib.util.find_spec("onnxruntime") is not None:
        assert report["parity_max_abs_logit_diff"] < 1e-4


def test_missing_checkpoint_is_an_error(tmp_path, capsys):
    assert main(["--format", "torchscript", "--model", str(tmp_path / "nope.pt")]) == 2
    assert "nope.pt" in capsys.readouterr().err
