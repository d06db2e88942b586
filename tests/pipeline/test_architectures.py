import pytest
import torch
from torch import nn

from pipeline.architectures import ARCHITECTURES, build_model, count_parameters, register


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))  # composites (ensembles) need members: test_ensemble.py
@pytest.mark.parametrize("side", [44, 48])
def test_every_architecture_maps_gray_faces_to_logits(name, side):
    model = build_model(name, 7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, side, side))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_required_architectures_and_sizes():
    assert {"compact", "wide"} <= set(ARCHITECTURES)
    # The compact net is the one measured at ~500 faces/s on the 2-core serving CPU; its size is part of that claim.
    assert count_parameters(build_model("compact", 7)) == 661_375
    assert count_parameters(build_model("wide", 7)) > 4 * count_parameters(build_model("compact", 7))


def test_kwargs_override_defaults():
    model = build_model("tiny", 3, in_channels=3, dropout=0.5)
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 3)
    assert isinstance(model.dropout, nn.Dropout) and model.dropout.p == 0.5


def test_count_parameters_trainable_only():
    model = build_model("tiny", 7)
    total = count_parameters(model)
    model.classifier.weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == total - model.classifier.weight.numel()


def test_unknown_architecture_is_named():
    with pytest.raises(ValueError, match="unknown architecture 'resnet9000'.*compact"):
        build_model("resnet9000", 7)


def test_register_refuses_to_replace():
    with pytest.raises(ValueError, match="already registered"):
        register("compact", lambda num_classes, **kwargs: nn.Linear(1, num_classes))


def test_resnet18_has_the_published_layout_adapted_to_48x48():
    from pipeline.architectures import ResNet

    model = build_model("resnet18", 7)
    assert isinstance(model, ResNet)
    # Four stages of two basic blocks: 16 convs in the blocks + the stem's, plus 3 projection shortcuts.
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 16 + 3
    # ResNet-18's ~11.2M parameters, less the 7x7 RGB stem and with a 7-way head.
    assert 11_000_000 < count_parameters(model) < 11_300_000
    # Stride-1 stem and no stem pool: a 48x48 face reaches the last stage at 6x6.
    with torch.no_grad():
        features = model.features(model.stem(torch.randn(1, 1, 48, 48)))
    assert features.shape == (1, 512, 6, 6)
