"""Training-time augmentation, batched on tensors: one random affine per face (shift, zoom, rotation, flip), colour
jitter and random erasing (:class:`TensorAugment`), and MixUp / CutMix of a batch (:func:`mix_batch`)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


class TensorAugment:
    """Batched training augmentation on uint8 N x H x W tensors -> normalized N x 1 x S x S floats.

    One affine warp per sample combines the random crop (translation up to the crop margin),
    zoom, rotation and horizontal flip; with all of them at zero it reduces to exactly the
    centre crop of :func:`preprocess_crops`, so training and serving see the same framing.
    """

    def __init__(
        self,
        input_size: int,
        resize_to: int,
        mean: float,
        std: float,
        scale: tuple[float, float] = (1.0, 1.0),
        translate_px: float | None = None,
        rotation_deg: float = 0.0,
        hflip: float = 0.0,
        color_jitter: float = 0.0,
        random_erase: float = 0.0,
    ) -> None:
        self.input_size = input_size
        self.resize_to = resize_to
        self.mean, self.std = mean, std
        self.scale = scale
        self.translate_px = (resize_to - input_size) / 2 if translate_px is None else translate_px
        self.rotation = math.radians(rotation_deg)
        self.hflip = hflip
        self.color_jitter = color_jitter
        self.random_erase = random_erase

    def _uniform(self, n: int, low: float, high: float, generator: torch.Generator) -> Tensor:
        return torch.rand(n, generator=generator) * (high - low) + low

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        n, side = images.shape[0], self.input_size
        x = images.unsqueeze(1).float().div_(255.0)
        angle = self._uniform(n, -self.rotation, self.rotation, generator)
        zoom = self._uniform(n, self.scale[0], self.scale[1], generator)
        flip = torch.where(torch.rand(n, generator=generator) < self.hflip, -1.0, 1.0)
        shift = self._uniform(2 * n, -self.translate_px, self.translate_px, generator).view(n, 2) * (2.0 / self.resize_to)
        # theta maps output coords (normalized to the crop) to input coords (normalized to the image):
        # the crop covers input_size/resize_to of the image; zoom > 1 magnifies.
        ratio = (side / self.resize_to) / zoom
        cos, sin = torch.cos(angle) * ratio, torch.sin(angle) * ratio
        theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1), torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)
        grid = F.affine_grid(theta, [n, 1, side, side], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if self.color_jitter > 0:
            j = self.color_jitter
            brightness = self._uniform(n, 1 - j, 1 + j, generator).view(n, 1, 1, 1)
            contrast = self._uniform(n, 1 - j, 1 + j, generator).view(n, 1, 1, 1)
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = ((x - mean) * contrast + mean * brightness).clamp_(0.0, 1.0)
        x = (x - self.mean) / self.std
        if self.random_erase > 0:
            x = self._erase(x, generator)
        return x

    def _erase(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Random erasing (Zhong et al.), vectorized: one rectangle of 2-33% area per chosen sample, set to 0 (the mean)."""
        n, _, h, w = x.shape
        chosen = torch.rand(n, generator=generator) < self.random_erase
        area = self._uniform(n, 0.02, 0.33, generator) * h * w
        aspect = torch.exp(self._uniform(n, math.log(0.3), math.log(1 / 0.3), generator))
        eh = torch.sqrt(area * aspect).clamp(1, h)
        ew = torch.sqrt(area / aspect).clamp(1, w)
        y0 = torch.rand(n, generator=generator) * (h - eh)
        x0 = torch.rand(n, generator=generator) * (w - ew)
        rows = torch.arange(h, dtype=torch.float32).view(1, h, 1)
        cols = torch.arange(w, dtype=torch.float32).view(1, 1, w)
        inside = (
            (rows >= y0.view(n, 1, 1)) & (rows < (y0 + eh).view(n, 1, 1)) & (cols >= x0.view(n, 1, 1)) & (cols < (x0 + ew).view(n, 1, 1))
        )
        mask = inside & chosen.view(n, 1, 1)
        return x.masked_fill(mask.unsqueeze(1), 0.0)


def mix_batch(
    x: Tensor,
    targets: Tensor,
    mixup_alpha: float,
    cutmix_alpha: float,
    mix_prob: float,
    rng: np.random.Generator,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """Mixup or CutMix (one of them, 50/50 when both are on) on a batch with soft targets."""
    use_mixup, use_cutmix = mixup_alpha > 0, cutmix_alpha > 0
    if not (use_mixup or use_cutmix) or rng.random() >= mix_prob:
        return x, targets
    cutmix = use_cutmix and (not use_mixup or rng.random() < 0.5)
    lam = float(rng.beta(cutmix_alpha, cutmix_alpha) if cutmix else rng.beta(mixup_alpha, mixup_alpha))
    perm = torch.randperm(x.shape[0], generator=generator)
    if cutmix:
        h, w = x.shape[-2:]
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(rng.integers(h)), int(rng.integers(w))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)  # the area actually pasted
    else:
        x = x * lam + x[perm] * (1.0 - lam)
    return x, targets * lam + targets[perm] * (1.0 - lam)


# --------------------------------------------------------------------------- helpers
