"""Image classification as a training objective: uint8 pixels and labels -> augmented, normalised
images -> cross-entropy, with the count of correct answers kept for evaluation.

Augmentation runs on the fly, in the worker, from the loop's per-(step, rank, micro-batch) generator, so
a resumed run sees the same augmented images. One affine warp per image does the random crop (a shift
of up to `shift` pixels, as padding and cropping would), the small rotation and the scale jitter;
horizontal flips only where they make sense (natural images, never characters).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.hf_vision import normalize


@dataclass(frozen=True)
class AugmentConfig:
    shift: int = 2  # pixels: a random crop of an image padded by this much (0: none)
    rotate_deg: float = 10.0  # uniform in +-rotate_deg
    scale: float = 0.1  # uniform in 1 +- scale
    flip: bool = False  # horizontal flips, p = 0.5

    def __post_init__(self) -> None:
        if self.shift < 0 or self.rotate_deg < 0 or not 0 <= self.scale < 1:
            raise ValueError("shift, rotate_deg: at least 0; scale: in [0, 1)")

    @property
    def off(self) -> bool:
        return not (self.shift or self.rotate_deg or self.scale or self.flip)


def augment(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Random affine warps of a batch (B, C, H, W); what moves in from outside is the background value
    (the batch's minimum: black once normalised)."""
    B, _, H, W = x.shape
    rand = lambda: torch.rand(B, generator=generator) * 2 - 1  # noqa: E731 - uniform in [-1, 1)
    angle = rand() * math.radians(cfg.rotate_deg)
    scale = 1 + rand() * cfg.scale
    flip = torch.where(torch.rand(B, generator=generator) < 0.5, -1.0, 1.0) if cfg.flip else torch.ones(B)
    tx, ty = rand() * 2 * cfg.shift / W, rand() * 2 * cfg.shift / H  # grid units: the image spans [-1, 1]
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], -1), torch.stack([sin * flip, cos, ty], -1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    background = x.amin(dim=(1, 2, 3), keepdim=True)
    return F.grid_sample(x - background, grid.to(x.device), mode="bilinear", padding_mode="zeros",
                         align_corners=False) + background


class ImageClassification(nn.Module):
    """Wraps a vision model (ResNet, ViT): `batch` turns columns `pixels` (B, H*W*C) uint8 and `label`
    (B,) into the forward's arguments, augmented while training; forward returns the mean cross-entropy
    and keeps the number of correct answers in `correct` (evaluation reads it)."""

    def __init__(self, model: nn.Module, size: int, channels: int, augmentation: AugmentConfig | None = None):
        super().__init__()
        self.model, self.size, self.channels = model, size, channels
        self.augmentation = augmentation or AugmentConfig()
        self.correct = torch.zeros(())

    def batch(self, rows: dict[str, torch.Tensor], generator: torch.Generator | None = None):
        x = normalize(rows["pixels"].view(-1, self.size, self.size, self.channels))  # (B, C, H, W)
        if self.training and not self.augmentation.off:
            x = augment(x, self.augmentation, generator or torch.Generator().manual_seed(0))
        return x, rows["label"].long()

    def forward(self, pixels: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.model(pixels)  # (B, num_labels)
        self.correct = (logits.argmax(-1) == labels).sum().detach()
        return F.cross_entropy(logits.float(), labels)
