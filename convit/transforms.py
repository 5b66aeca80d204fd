"""Per-image transforms of the DeiT recipe, written on PIL and torch (no torchvision).

Every random transform takes an explicit ``rng`` (a ``random.Random``), seeded per sample by the
sampler from (seed, epoch, rank, position): the augmentation of an image does not depend on which
DataLoader worker decodes it, so a run resumed in the middle of an epoch sees the same images.

- ``train_transform``: RandomResizedCrop(0.08-1, 3/4-4/3, bicubic) + horizontal flip +
  RandAugment (timm's ``rand-m9-mstd0.5-inc1``: 2 ops, magnitude 9 with Gaussian noise of std 0.5,
  each op applied with probability 0.5) or colour jitter, then to tensor and normalisation.
- ``eval_transform``: resize the shorter side to size / 0.875 (256 for 224), centre crop, normalise.
"""
from __future__ import annotations

import math
import random
import re
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Compose", "RandomResizedCrop", "RandomHorizontalFlip",
           "RandAugment", "ColorJitter", "ResizeShorter", "CenterCrop", "ToTensor", "Normalize",
           "RandomShift", "train_transform", "eval_transform", "parse_rand_augment"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_FILL = tuple(round(255 * m) for m in IMAGENET_MEAN)  # what rotated/sheared-in pixels get
_INTERP = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


class Compose:
    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, img, rng: Optional[random.Random] = None):
        rng = rng if rng is not None else random.Random()
        for t in self.transforms:
            img = t(img, rng)
        return img

    def __repr__(self):
        return "Compose(" + ", ".join(repr(t) for t in self.transforms) + ")"


class RandomResizedCrop:
    """A crop of random area fraction in ``scale`` and aspect ratio in ``ratio`` (log-uniform),
    resized to ``size`` x ``size``; after 10 failed draws, the largest centred crop in ``ratio``."""

    def __init__(self, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation="bicubic"):
        self.size, self.scale, self.ratio = size, scale, ratio
        self.interpolation = _INTERP[interpolation]

    def get_box(self, width: int, height: int, rng: random.Random) -> Tuple[int, int, int, int]:
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = rng.randint(0, height - h)
                left = rng.randint(0, width - w)
                return left, top, w, h
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            w, h = int(round(height * max(self.ratio))), height
        else:
            w, h = width, height
        return (width - w) // 2, (height - h) // 2, w, h

    def __call__(self, img: Image.Image, rng: random.Random) -> Image.Image:
        left, top, w, h = self.get_box(img.width, img.height, rng)
        return img.resize((self.size, self.size), self.interpolation, box=(left, top, left + w, top + h))


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, img, rng: random.Random):
        return img.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < self.p else img


# RandAugment ops, "increasing" variants: a larger magnitude is always a stronger change.
# Each takes (img, m, rng) with m the magnitude in [0, 10].
def _signed(v: float, rng: random.Random) -> float:
    return -v if rng.random() < 0.5 else v


def _affine(img, matrix):
    return img.transform(img.size, Image.AFFINE, matrix, resample=Image.BILINEAR, fillcolor=_FILL)


def _enhance(enhancer):
    return lambda img, m, rng: enhancer(img).enhance(1.0 + _signed(m / 10 * 0.9, rng))


def _solarize_add(img, m, rng):
    add = int(m / 10 * 110)
    lut = [min(255, i + add) if i < 128 else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


_RAND_OPS = {
    "AutoContrast": lambda img, m, rng: ImageOps.autocontrast(img),
    "Equalize": lambda img, m, rng: ImageOps.equalize(img),
    "Invert": lambda img, m, rng: ImageOps.invert(img),
    "Rotate": lambda img, m, rng: img.rotate(_signed(m / 10 * 30, rng), resample=Image.BILINEAR, fillcolor=_FILL),
    "PosterizeIncreasing": lambda img, m, rng: ImageOps.posterize(img, max(1, 4 - int(m / 10 * 4))),
    "SolarizeIncreasing": lambda img, m, rng: ImageOps.solarize(img, 256 - int(m / 10 * 256)),
    "SolarizeAdd": _solarize_add,
    "ColorIncreasing": _enhance(ImageEnhance.Color),
    "ContrastIncreasing": _enhance(ImageEnhance.Contrast),
    "BrightnessIncreasing": _enhance(ImageEnhance.Brightness),
    "SharpnessIncreasing": _enhance(ImageEnhance.Sharpness),
    "ShearX": lambda img, m, rng: _affine(img, (1, _signed(m / 10 * 0.3, rng), 0, 0, 1, 0)),
    "ShearY": lambda img, m, rng: _affine(img, (1, 0, 0, _signed(m / 10 * 0.3, rng), 1, 0)),
    "TranslateXRel": lambda img, m, rng: _affine(img, (1, 0, _signed(m / 10 * 0.45, rng) * img.width, 0, 1, 0)),
    "TranslateYRel": lambda img, m, rng: _affine(img, (1, 0, 0, 0, 1, _signed(m / 10 * 0.45, rng) * img.height)),
}


def parse_rand_augment(policy: str) -> Tuple[int, float, float]:
    """'rand-m9-mstd0.5-inc1' -> (num_ops=2, magnitude=9.0, magnitude_std=0.5)."""
    parts = policy.split("-")
    if parts[0] != "rand":
        raise ValueError(f"--aa: only RandAugment policies 'rand-m<M>-mstd<S>[-n<N>]' (or 'none') are "
                         f"supported; got {policy!r}")
    num_ops, magnitude, std = 2, 10.0, 0.0
    for part in parts[1:]:
        key, value = re.match(r"([a-z]+)([\d.]*)$", part).groups()
        if key == "m":
            magnitude = float(value)
        elif key == "mstd":
            std = float(value)
        elif key == "n":
            num_ops = int(value)
        elif key == "inc":
            if value != "1":
                raise ValueError(f"--aa: only the increasing ops (inc1) are implemented; got {policy!r}")
        else:
            raise ValueError(f"--aa: unknown RandAugment option {part!r} in {policy!r}")
    return num_ops, magnitude, std


class RandAugment:
    """``num_ops`` ops drawn with replacement, each applied with probability ``prob``, at a
    magnitude drawn from N(magnitude, magnitude_std) clipped to [0, 10] (timm's semantics)."""

    def __init__(self, num_ops=2, magnitude=9.0, magnitude_std=0.5, prob=0.5):
        self.num_ops, self.magnitude, self.magnitude_std, self.prob = num_ops, magnitude, magnitude_std, prob
        self.ops = list(_RAND_OPS)

    def __call__(self, img: Image.Image, rng: random.Random) -> Image.Image:
        for _ in range(self.num_ops):
            name = self.ops[rng.randrange(len(self.ops))]
            if rng.random() > self.prob:
                continue
            m = self.magnitude
            if self.magnitude_std > 0:
                m = rng.gauss(m, self.magnitude_std)
            img = _RAND_OPS[name](img, min(10.0, max(0.0, m)), rng)
        return img

    def __repr__(self):
        return f"RandAugment(n={self.num_ops}, m={self.magnitude}, mstd={self.magnitude_std}, p={self.prob})"


class ColorJitter:
    """Brightness, contrast and saturation factors uniform in [1 - s, 1 + s], in a random order."""

    def __init__(self, strength: float):
        self.strength = strength

    def __call__(self, img, rng: random.Random):
        ops = [ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color]
        rng.shuffle(ops)
        for op in ops:
            img = op(img).enhance(rng.uniform(max(0.0, 1 - self.strength), 1 + self.strength))
        return img


class ResizeShorter:
    def __init__(self, size: int, interpolation="bicubic"):
        self.size, self.interpolation = size, _INTERP[interpolation]

    def __call__(self, img, rng=None):
        w, h = img.size
        if w <= h:
            new = (self.size, max(1, int(self.size * h / w)))
        else:
            new = (max(1, int(self.size * w / h)), self.size)
        return img.resize(new, self.interpolation)


class CenterCrop:
    """The centred ``size`` crop: an int for a square, or (height, width)."""

    def __init__(self, size):
        self.size = size

    def __call__(self, img, rng=None):
        w, h = img.size
        ch, cw = (self.size, self.size) if isinstance(self.size, int) else self.size
        left, top = int(round((w - cw) / 2)), int(round((h - ch) / 2))
        return img.crop((left, top, left + cw, top + ch))


class ToTensor:
    """PIL image -> float32 (C, H, W) in [0, 1]."""

    def __call__(self, img, rng=None):
        arr = np.asarray(img, dtype=np.uint8)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


class Normalize:
    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, x: torch.Tensor, rng=None):
        return (x - self.mean) / self.std


class RandomShift:
    """Tensor (C, H, W): translate by up to ``pad`` pixels each way, filling with zeros."""

    def __init__(self, pad: int):
        self.pad = pad

    def __call__(self, x: torch.Tensor, rng: random.Random):
        if self.pad <= 0:
            return x
        p = self.pad
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        dy, dx = rng.randint(0, 2 * p), rng.randint(0, 2 * p)
        return padded[:, dy:dy + x.shape[1], dx:dx + x.shape[2]]


def train_transform(size: int, aa: Optional[str] = "rand-m9-mstd0.5-inc1", color_jitter: float = 0.4,
                    interpolation: str = "bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Compose:
    """The DeiT training transform for PIL images (random erasing runs later, on the device)."""
    steps: List[Callable] = [RandomResizedCrop(size, interpolation=interpolation), RandomHorizontalFlip()]
    if aa and aa.lower() != "none":
        steps.append(RandAugment(*parse_rand_augment(aa)))
    elif color_jitter > 0:
        steps.append(ColorJitter(color_jitter))
    return Compose(steps + [ToTensor(), Normalize(mean, std)])


def eval_transform(size, crop_pct: float = 0.875, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Compose:
    """Resize the shorter side to int(size / crop_pct) (bicubic), centre crop ``size``, normalise.

    ``size``: an int, or (height, width) for a non-square input (the resize then uses the longer
    of the two, so that the crop fits)."""
    longest = size if isinstance(size, int) else max(size)
    return Compose([ResizeShorter(int(longest / crop_pct)), CenterCrop(size), ToTensor(), Normalize(mean, std)])
