import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from pipeline import cli
from pipeline.architectures import build_model
from pipeline.checkpoint import ModelMetadata, save_checkpoint
from pipeline.training.data import FER_CLASSES
from pipeline.training.explain import explained_layers, grad_cam


class MeanActivationModel(nn.Module):
    """Class 1's logit is the mean of a 1x1 convolution's output, class 0's is its negation."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 1, bias=False)
        nn.init.ones_(self.conv.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        evidence = self.conv(x).mean(dim=(1, 2, 3))
        return torch.stack([-evidence, evidence], 1)


def test_grad_cam_lights_up_where_the_evidence_for_the_class_is() -> None:
    model = MeanActivationModel()
    inputs = torch.zeros(2, 1, 8, 8)
    inputs[0, 0, :3, :3] = 1.0  # evidence in the top-left corner
    inputs[1, 0, 5:, 4:] = 1.0  # and in the bottom-right one
    cams, probabilities = grad_cam(model, inputs, class_indices=[1, 1])
    assert cams.shape == (2, 8, 8) and probabilities.shape == (2, 2)
    assert cams[0, :3, :3].min() == pytest.approx(1.0) and cams[0, 4:].max() == pytest.approx(0.0, abs=1e-6)
    assert cams[1, 5:, 4:].min() == pytest.approx(1.0) and cams[1, :4].max() == pytest.approx(0.0, abs=1e-6)
    # The same pixels count against class 0: its map is empty (the ReLU keeps only positive evidence).
    against, _ = grad_cam(model, inputs, class_indices=[0, 0])
    assert against.max() == pytest.approx(0.0, abs=1e-6)
    assert explained_layers(model) == [model.conv]


def test_an_ensemble_is_explained_through_every_member(tmp_path) -> None:
    from pipeline.architectures import ProbabilityEnsemble

    member = {"arch": "tiny", "arch_kwargs": {}, "mean": [0.5], "std": [0.3]}
    ensemble = ProbabilityEnsemble(7, [member, member], weights=[1.0, 1.0], mean=[0.5], std=[0.3])
    layers = explained_layers(ensemble)
    assert len(layers) == 2 and layers[0] is not layers[1]
    cams, _ = grad_cam(ensemble, torch.randn(3, 1, 44, 44))
    assert cams.shape == (3, 44, 44) and np.isfinite(cams).all()


def test_ferstream_explain_writes_one_overlay_per_image(tmp_path, capsys) -> None:
    torch.manual_seed(0)
    model_path = tmp_path / "tiny.pt"
    save_checkpoint(
        model_path, build_model("tiny", 7), ModelMetadata("tiny-x", "tiny", {}, FER_CLASSES, 44, 48, True, (0.5,), (0.3,), 0.0, {})
    )
    rng = np.random.default_rng(0)
    images = []
    for i, shape in enumerate([(48, 48), (96, 80, 3)]):
        path = tmp_path / f"face{i}.png"
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(path)
        images.append(str(path))
    out = tmp_path / "overlays"
    assert cli.main(["explain", *images, "--model", str(model_path), "--output-dir", str(out), "--class", "happy"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model_id"] == "tiny-x" and len(report["results"]) == 2
    for row, image in zip(report["results"], images, strict=True):
        assert row["image"] == image and row["explained_class"] == "happy" and row["predicted"] in FER_CLASSES
        assert (out / f"{image.rsplit('/', 1)[1][:-4]}_gradcam.png").stat().st_size > 1000
    assert cli.main(["explain", images[0], "--model", str(model_path), "--class", "bored"]) == 2
    assert "'bored' is not one of the model's classes" in capsys.readouterr().err
