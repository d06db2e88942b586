"""Expression-classifier architectures for small grayscale face crops (FER2013: 48x48).

The shipped networks are VGG-style (stacks of conv3x3+BN+ReLU, max-pooling between stages,
global average pooling and one linear layer). That family is what measured best for
throughput per accuracy on the 2-core serving CPU: plain 3x3 convolutions map well
onto oneDNN, while depthwise/SE blocks cost more latency than their FLOPs suggest.
Global average pooling keeps the head independent of the input side, so the same
architecture works for 48x48 or 44x44 (centre-cropped) inputs.

``resnet18`` is the residual net published FER2013 baselines use (He et al.'s ResNet-18 layout:
four stages of two basic blocks), adapted to 48x48 the usual way for small images: a 3x3 stride-1
stem without the max-pool, so the last stage still sees 6x6 rather than 2x2. It is in the
``ferstream automl`` search space as the heavier, non-VGG alternative.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "ARCHITECTURES",
    "COMPOSITE_ARCHITECTURES",
    "ProbabilityEnsemble",
    "ResNet",
    "VggNet",
    "build_model",
    "count_parameters",
    "known_architectures",
    "register",
]


class VggNet(nn.Module):
    """``len(widths)`` stages of ``convs_per_stage`` conv3x3+BN+ReLU, max-pool between stages."""

    def __init__(
        self,
        num_classes: int,
        widths: Sequence[int],
        convs_per_stage: int = 2,
        in_channels: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not widths:
            raise ValueError("widths must not be empty")
        layers: list[nn.Module] = []
        channels = in_channels
        for stage, width in enumerate(widths):
            if stage > 0:
                # Pool between stages only: with 4 stages a 48x48 face ends at 6x6, which still
                # leaves spatial detail (mouth vs. eyes) for the last stage to combine.
                layers.append(nn.MaxPool2d(2))
            for _ in range(convs_per_stage):
                # bias=False: the following BatchNorm has its own shift.
                layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(channels, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.features(x)).flatten(1)
        return self.classifier(self.dropout(x))


class BasicBlock(nn.Module):
    """Two conv3x3+BN with an identity (or 1x1 projection) shortcut, as in ResNet-18/34."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet with basic blocks for small grayscale inputs: 3x3 stride-1 stem, no stem max-pool."""

    def __init__(
        self,
        num_classes: int,
        widths: Sequence[int] = (64, 128, 256, 512),
        blocks_per_stage: Sequence[int] = (2, 2, 2, 2),
        in_channels: int = 1,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if not widths or len(widths) != len(blocks_per_stage):
            raise ValueError(f"widths {list(widths)} and blocks_per_stage {list(blocks_per_stage)} must be non-empty and equally long")
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
        )
        stages: list[nn.Module] = []
        channels = widths[0]
        for stage, (width, blocks) in enumerate(zip(widths, blocks_per_stage, strict=True)):
            for block in range(blocks):
                # Downsample at the first block of every stage but the first: 48 -> 48, 24, 12, 6.
                stride = 2 if stage > 0 and block == 0 else 1
                stages.append(BasicBlock(channels, width, stride))
                channels = width
        self.features = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for module in self.modules():
            # Zero-init the last BN of each residual branch: every block starts as the identity (Goyal et al.).
            if isinstance(module, BasicBlock):
                nn.init.zeros_(module.bn2.weight)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.features(self.stem(x))).flatten(1)
        return self.classifier(self.dropout(x))


class ProbabilityEnsemble(nn.Module):
    """A weighted average of member networks' class probabilities, as one network.

    ``members`` describe each network as plain data (``{"arch", "arch_kwargs", "mean", "std"}``), so an
    ensemble is stored in the ordinary checkpoint format: the spec lives in the metadata's
    ``arch_kwargs`` and the members' weights in the state dict under ``members.<i>.``. Inputs arrive
    normalized with the ensemble's ``mean``/``std``; a member trained with other statistics gets
    them re-applied, so members from different runs can be combined.

    The output is ``log(sum_i w_i softmax(member_i(x))) / temperature``: a softmax of it gives the
    averaged probabilities (at temperature 1), so every consumer that treats the output as logits
    (the service, ``ferstream eval``, the ONNX export, a distillation teacher) works unchanged.
    ``temperature`` is a buffer, so ``ferstream calibrate`` changes the state dict only.
    """

    def __init__(
        self,
        num_classes: int,
        members: Sequence[Mapping[str, Any]],
        weights: Sequence[float],
        mean: Sequence[float] = (0.0,),
        std: Sequence[float] = (1.0,),
        in_channels: int = 1,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member")
        if len(weights) != len(members):
            raise ValueError(f"{len(members)} members but {len(weights)} weights")
        if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"ensemble weights must be >= 0 with a positive sum, got {list(weights)}")
        self.members = nn.ModuleList(
            build_model(str(m["arch"]), num_classes, in_channels=in_channels, **dict(m.get("arch_kwargs", {}))) for m in members
        )
        total = float(sum(weights))
        self.register_buffer("weights", torch.tensor([w / total for w in weights], dtype=torch.float32))
        # Per member: x_member = x * scale + shift turns the ensemble's normalization into the member's.
        scales, shifts = [], []
        for member in members:
            m_mean, m_std = member.get("mean", mean), member.get("std", std)
            scales.append([s / ms for s, ms in zip(std, m_std, strict=True)])
            shifts.append([(e - me) / ms for e, me, ms in zip(mean, m_mean, m_std, strict=True)])
        # members x channels; shaped for broadcasting in forward (a 4-D/5-D buffer would break .to(memory_format=...)).
        self.register_buffer("input_scale", torch.tensor(scales, dtype=torch.float32))
        self.register_buffer("input_shift", torch.tensor(shifts, dtype=torch.float32))
        self.register_buffer("temperature", torch.tensor(float(temperature), dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        probabilities = torch.stack(
            [
                torch.softmax(member(x * self.input_scale[i].view(1, -1, 1, 1) + self.input_shift[i].view(1, -1, 1, 1)), dim=1)
                for i, member in enumerate(self.members)
            ]
        )
        mixed = (probabilities * self.weights.view(-1, 1, 1)).sum(0)
        return torch.log(mixed.clamp_min(1e-12)) / self.temperature


def _vgg(widths: Sequence[int], dropout: float) -> Callable[..., nn.Module]:
    def factory(num_classes: int, **kwargs: Any) -> nn.Module:
        options: dict[str, Any] = {"widths": tuple(widths), "dropout": dropout}
        options.update(kwargs)
        return VggNet(num_classes, **options)

    return factory


def _resnet(widths: Sequence[int], blocks_per_stage: Sequence[int], dropout: float) -> Callable[..., nn.Module]:
    def factory(num_classes: int, **kwargs: Any) -> nn.Module:
        options: dict[str, Any] = {"widths": tuple(widths), "blocks_per_stage": tuple(blocks_per_stage), "dropout": dropout}
        options.update(kwargs)
        return ResNet(num_classes, **options)

    return factory


# name -> factory(num_classes, **kwargs). kwargs override the defaults (e.g. dropout, in_channels)
# and are stored in the checkpoint metadata so the exact network can be rebuilt.
ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    # Test/smoke-run size: trains in seconds, never shipped.
    "tiny": _vgg((8, 16, 32, 64), dropout=0.0),
    # CPU serving: ~661k params, ~500 faces/s at 48x48 on 2 cores (more at a 44x44 crop).
    "compact": _vgg((24, 48, 96, 192), dropout=0.2),
    # GPU serving: ~4.7M params, the classic FER2013 VGG widths.
    "wide": _vgg((64, 128, 256, 512), dropout=0.3),
    # The published-FER ResNet-18 layout (~11.2M params), 48x48-adapted stem: a GPU training candidate.
    "resnet18": _resnet((64, 128, 256, 512), (2, 2, 2, 2), dropout=0.0),
}

# Models made of other models: loadable from a checkpoint like any architecture, but not trainable
# from scratch (their constructor needs the members), so `ferstream train --arch` does not offer them.
COMPOSITE_ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    # Weighted probability average of any models (`ferstream ensemble` writes these).
    "ensemble": ProbabilityEnsemble,
}


def known_architectures() -> list[str]:
    """Every architecture a checkpoint may name."""
    return sorted({*ARCHITECTURES, *COMPOSITE_ARCHITECTURES})


def register(name: str, factory: Callable[..., nn.Module]) -> None:
    """Add an architecture; refuses to silently replace one that checkpoints may refer to."""
    if name in ARCHITECTURES or name in COMPOSITE_ARCHITECTURES:
        raise ValueError(f"architecture {name!r} is already registered")
    ARCHITECTURES[name] = factory


def build_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    factory = ARCHITECTURES.get(name) or COMPOSITE_ARCHITECTURES.get(name)
    if factory is None:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(known_architectures())}")
    return factory(num_classes, **kwargs)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
