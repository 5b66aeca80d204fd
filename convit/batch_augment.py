"""Batch augmentations of the DeiT recipe, run on the training device.

- ``RandomErasing``: per image, with probability 0.25, one rectangle of 2%-33% of the area and
  aspect ratio in [0.3, 3.3] (log-uniform) filled with N(0, 1) noise (timm's "pixel" mode), on
  normalised images.
- ``Mixup``: per batch, with probability ``prob``, CutMix (when ``switch_prob`` says so) or Mixup
  with the batch reversed, lam ~ Beta(alpha, alpha); targets become the same mixture of smoothed
  one-hot labels (off = smoothing / C, on = 1 - smoothing + off). With both alphas 0 it only
  smooths the labels, so one loss serves every configuration:
- ``soft_target_cross_entropy``: mean over the batch of ``sum_c -target_c log_softmax(logits)_c``.

Scalar draws come from a ``random.Random`` and pixel noise from a ``torch.Generator``, both seeded
per step by the training loop: a resumed run draws exactly what the uninterrupted one drew.
"""
from __future__ import annotations

import math
import random
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["RandomErasing", "Mixup", "smooth_one_hot", "soft_target_cross_entropy"]


class RandomErasing:
    def __init__(self, probability: float = 0.25, min_area: float = 0.02, max_area: float = 1 / 3,
                 min_aspect: float = 0.3, max_aspect: Optional[float] = None):
        self.probability, self.min_area, self.max_area = probability, min_area, max_area
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, rng: random.Random, generator: Optional[torch.Generator] = None):
        """Erase in place in ``x`` (B, C, H, W); returns ``x``."""
        if self.probability <= 0:
            return x
        B, C, H, W = x.shape
        for b in range(B):
            if rng.random() > self.probability:
                continue
            for _ in range(10):
                area = H * W * rng.uniform(self.min_area, self.max_area)
                aspect = math.exp(rng.uniform(*self.log_aspect))
                h = int(round(math.sqrt(area * aspect)))
                w = int(round(math.sqrt(area / aspect)))
                if 0 < h < H and 0 < w < W:
                    top, left = rng.randint(0, H - h), rng.randint(0, W - w)
                    noise = torch.randn((C, h, w), generator=generator, device=x.device, dtype=torch.float32)
                    x[b, :, top:top + h, left:left + w] = noise.to(x.dtype)
                    break
        return x


def smooth_one_hot(target: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """(B,) int labels -> (B, C) float32 rows: 1 - smoothing + smoothing / C on the label, smoothing / C off."""
    off = smoothing / num_classes
    out = torch.full((target.shape[0], num_classes), off, device=target.device, dtype=torch.float32)
    return out.scatter_(1, target.view(-1, 1), 1.0 - smoothing + off)


class Mixup:
    def __init__(self, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, prob: float = 1.0,
                 switch_prob: float = 0.5, label_smoothing: float = 0.1, num_classes: int = 1000):
        self.mixup_alpha, self.cutmix_alpha = mixup_alpha, cutmix_alpha
        self.prob, self.switch_prob = prob, switch_prob
        self.label_smoothing, self.num_classes = label_smoothing, num_classes

    @property
    def active(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def draw(self, rng: random.Random) -> Tuple[float, bool]:
        """(lam, use_cutmix) for one batch; lam = 1 means no mixing."""
        if not self.active or rng.random() >= self.prob:
            return 1.0, False
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = rng.random() < self.switch_prob
        else:
            use_cutmix = self.cutmix_alpha > 0
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        return rng.betavariate(alpha, alpha), use_cutmix

    @staticmethod
    def cutmix_box(lam: float, H: int, W: int, rng: random.Random) -> Tuple[int, int, int, int]:
        """A box of about (1 - lam) of the image, centred uniformly and clipped to the image."""
        ratio = math.sqrt(1.0 - lam)
        cut_h, cut_w = int(H * ratio), int(W * ratio)
        cy, cx = rng.randrange(H), rng.randrange(W)
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, H)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, W)
        return y0, y1, x0, x1

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, target: torch.Tensor, rng: random.Random):
        """Mix ``x`` (B, C, H, W) in place with its reversal; return (x, soft targets (B, C) float32)."""
        lam, use_cutmix = self.draw(rng)
        if lam < 1.0:
            if use_cutmix:
                y0, y1, x0, x1 = self.cutmix_box(lam, x.shape[-2], x.shape[-1], rng)
                x[:, :, y0:y1, x0:x1] = x.flip(0)[:, :, y0:y1, x0:x1]
                lam = 1.0 - (y1 - y0) * (x1 - x0) / (x.shape[-2] * x.shape[-1])  # the area really swapped
            else:
                flipped = x.flip(0)  # a copy, taken before x is scaled in place
                x.mul_(lam).add_(flipped.mul_(1.0 - lam))
        y = smooth_one_hot(target, self.num_classes, self.label_smoothing)
        if lam < 1.0:
            y = y * lam + y.flip(0) * (1.0 - lam)
        return x, y


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the cross-entropy with soft targets, computed in float32."""
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
