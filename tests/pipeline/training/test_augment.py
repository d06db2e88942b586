"""Batched tensor augmentation and mixup/cutmix (pipeline/training/augment.py)."""

import numpy as np
import pytest
import torch

from pipeline.checkpoint import ModelMetadata, preprocess_crops
from pipeline.training.augment import TensorAugment, mix_batch


def metadata(input_size: int = 44) -> ModelMetadata:
    return ModelMetadata("m", "tiny", {}, ("a", "b"), input_size, 48, True, (0.5,), (0.3,), 0.1, {})


def test_augment_without_randomness_is_the_serving_transform():
    images = np.random.default_rng(0).integers(0, 256, (5, 48, 48), dtype=np.uint8)
    augment = TensorAugment(44, 48, 0.5, 0.3, translate_px=0.0)
    out = augment(torch.from_numpy(images), torch.Generator().manual_seed(0))
    expected = preprocess_crops(list(images), metadata())
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_augment_is_random_but_reproducible():
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (8, 48, 48), dtype=np.uint8))
    augment = TensorAugment(44, 48, 0.5, 0.3, scale=(0.9, 1.1), rotation_deg=10, hflip=0.5, color_jitter=0.2, random_erase=1.0)
    a = augment(images, torch.Generator().manual_seed(1))
    b = augment(images, torch.Generator().manual_seed(1))
    c = augment(images, torch.Generator().manual_seed(2))
    assert a.shape == (8, 1, 44, 44)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert ((a == 0).flatten(1).sum(1) > 0).all(), "random erasing with p=1 blanks a patch in every sample"


def test_hflip_only_mirrors():
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 48, 48), dtype=np.uint8))
    plain = TensorAugment(48, 48, 0.5, 0.3)(images, torch.Generator().manual_seed(0))
    flipped = TensorAugment(48, 48, 0.5, 0.3, hflip=1.0)(images, torch.Generator().manual_seed(0))
    torch.testing.assert_close(flipped, plain.flip(-1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("mixup,cutmix", [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_mixed_targets_stay_distributions(mixup, cutmix):
    x = torch.randn(6, 1, 44, 44)
    targets = torch.nn.functional.one_hot(torch.arange(6) % 3, 3).float()
    mixed_x, mixed_t = mix_batch(x, targets, mixup, cutmix, 1.0, np.random.default_rng(0), torch.Generator().manual_seed(0))
    assert mixed_x.shape == x.shape
    torch.testing.assert_close(mixed_t.sum(1), torch.ones(6))
