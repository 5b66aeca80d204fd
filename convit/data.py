"""Datasets of the training CLI: scikit-learn digits (the embedded default), ImageFolder, synthetic.

Every dataset is indexed by ``(index, aug_seed)`` pairs (see ``convit.samplers.BatchPlan``) and
returns ``(image tensor, label, None)``, or ``(None, label, path)`` for an image that could not be
decoded; ``collate`` drops those and hands their paths to the training loop, which counts and logs
them (``strict=True`` raises instead).
"""
from __future__ import annotations

import dataclasses
import os
import random
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from . import transforms as T

__all__ = ["IMG_EXTENSIONS", "DataBundle", "DigitsDataset", "ImageFolderDataset", "SyntheticDataset",
           "scan_image_folder", "subsample_per_class", "load_digits_split", "digits_normalize", "collate",
           "build_datasets", "UnreadableImageError", "verify_images", "sample_images"]

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class UnreadableImageError(RuntimeError):
    pass


def _unpack(key) -> Tuple[int, int]:
    if isinstance(key, (tuple, list)):
        return int(key[0]), int(key[1])
    return int(key), int(key)


class DigitsDataset(torch.utils.data.Dataset):
    """In-memory (N, 1, 8, 8) float images in [0, 1] with a tensor transform taking (x, rng)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Optional[Callable] = None):
        self.images, self.labels, self.transform = images, labels, transform
        self.targets = labels.tolist()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, key):
        idx, seed = _unpack(key)
        x = self.images[idx]
        if self.transform is not None:
            x = self.transform(x, random.Random(seed))
        return x, int(self.labels[idx]), None


def load_digits_split(val_fraction: float = 0.2, split_seed: int = 0):
    """scikit-learn's 1797 handwritten digits, split once and for all (stratified, seed 0):
    1437 training and 360 validation images, (N, 1, 8, 8) float32 in [0, 1], int64 labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)
    y = torch.from_numpy(digits.target.astype(np.int64))
    idx_train, idx_val = train_test_split(np.arange(len(y)), test_size=val_fraction, stratify=digits.target,
                                          random_state=split_seed)
    idx_train, idx_val = torch.from_numpy(np.sort(idx_train)), torch.from_numpy(np.sort(idx_val))
    return x[idx_train], y[idx_train], x[idx_val], y[idx_val]


def digits_normalize(x_train: torch.Tensor) -> T.Normalize:
    """The digits' normalisation: by the mean and std of the training images (one channel)."""
    return T.Normalize([x_train.mean().item()], [x_train.std().item()])


def scan_image_folder(root: str) -> Tuple[List[Tuple[str, int]], List[str]]:
    """(samples [(path, class index)], sorted class names) of ``root/<class>/<image>``.

    Raises FileNotFoundError for a missing root, ValueError naming the folders with no image.
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root!r} does not exist or is not a directory")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise ValueError(f"image folder {root!r} has no class sub-folders (expected {root}/<class>/<image>)")
    samples, empty = [], []
    for label, name in enumerate(classes):
        found = []
        for dirpath, _, files in sorted(os.walk(os.path.join(root, name), followlinks=True)):
            found += [os.path.join(dirpath, f) for f in sorted(files) if f.lower().endswith(IMG_EXTENSIONS)]
        if not found:
            empty.append(os.path.join(root, name))
        samples += [(p, label) for p in found]
    if empty:
        raise ValueError(f"{len(empty)} class folder(s) hold no image ({', '.join(IMG_EXTENSIONS)}): "
                         + ", ".join(empty))
    return samples, classes


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images decoded with PIL (RGB) in the DataLoader workers; transform takes (img, rng)."""

    def __init__(self, samples: Sequence[Tuple[str, int]], classes: Sequence[str], transform: Callable,
                 strict: bool = False):
        self.samples, self.classes, self.transform, self.strict = list(samples), list(classes), transform, strict
        self.targets = [label for _, label in self.samples]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        idx, seed = _unpack(key)
        path, label = self.samples[idx]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except Exception as err:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
            if self.strict:
                raise UnreadableImageError(f"cannot read image {path!r}: {err} (drop --strict-data to skip "
                                           "unreadable images)") from err
            return None, label, path
        return self.transform(img, random.Random(seed)), label, None


def _verify_one(path: str) -> Optional[str]:
    try:
        with Image.open(path) as img:
            img.verify()
    except Exception as err:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
        return f"{path} ({type(err).__name__}: {' '.join(str(err).split())})"
    return None


def verify_images(paths: Sequence[str], threads: int = 1) -> List[str]:
    """The entries of ``paths`` PIL cannot open and ``verify()``, each as 'path (reason)', in order.

    ``verify`` reads the header and checks the structure (PNG chunk CRCs, for one) without decoding
    the pixels, so it is much cheaper than a decode; a file whose pixel data is corrupt past the
    structure it checks still fails later, when it is decoded.
    """
    if threads > 1 and len(paths) > 64:
        from concurrent.futures import ThreadPoolExecutor  # file reads release the GIL
        with ThreadPoolExecutor(threads) as pool:
            results = list(pool.map(_verify_one, paths, chunksize=256))
    else:
        results = [_verify_one(p) for p in paths]
    return [r for r in results if r is not None]


class SyntheticDataset(torch.utils.data.Dataset):
    """Random normalised images, a deterministic function of the index (no data, no decoding)."""

    def __init__(self, length: int, in_chans: int, size: int, num_classes: int, salt: int = 0):
        self.length, self.shape, self.num_classes, self.salt = length, (in_chans, size, size), num_classes, salt
        self.targets = [self._label(i) for i in range(length)]

    def _label(self, idx):
        return (idx * 7919 + self.salt) % self.num_classes

    def __len__(self):
        return self.length

    def __getitem__(self, key):
        idx, _ = _unpack(key)
        g = torch.Generator().manual_seed(idx * 2 + self.salt)
        return torch.randn(self.shape, generator=g), self._label(idx), None


def subsample_per_class(targets: Sequence[int], ratio: float, seed: int = 0) -> List[int]:
    """Indices keeping ``ratio`` of every class (at least one image each), a fixed random choice."""
    if ratio >= 1.0:
        return list(range(len(targets)))
    by_class = {}
    for i, t in enumerate(targets):
        by_class.setdefault(int(t), []).append(i)
    rng = random.Random(seed)
    keep = []
    for t in sorted(by_class):
        members = by_class[t]
        n = max(1, int(round(ratio * len(members))))
        keep += rng.sample(members, n)
    return sorted(keep)


class _Subset(torch.utils.data.Dataset):
    def __init__(self, base, indices):
        self.base, self.indices = base, list(indices)
        self.targets = [base.targets[i] for i in self.indices]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, key):
        idx, seed = _unpack(key)
        return self.base[(self.indices[idx], seed)]


def collate(batch):
    """-> (images (B, C, H, W) or None, labels (B,), [paths of unreadable images])."""
    good = [(x, y) for x, y, bad in batch if bad is None]
    bad_paths = [bad for _, _, bad in batch if bad is not None]
    if not good:
        return None, None, bad_paths
    return torch.stack([x for x, _ in good]), torch.tensor([y for _, y in good], dtype=torch.long), bad_paths


@dataclasses.dataclass
class DataBundle:
    name: str
    train: torch.utils.data.Dataset
    val: torch.utils.data.Dataset
    num_classes: int
    in_chans: int
    input_size: int


def build_datasets(config) -> DataBundle:
    """The datasets ``config`` asks for; bad paths and empty class folders raise before training."""
    if config.synthetic:
        size, classes = config.input_size or 224, config.nb_classes or 1000
        train = SyntheticDataset(max(40 * config.batch_size, 512), 3, size, classes, salt=0)
        val = SyntheticDataset(max(4 * config.batch_size, 128), 3, size, classes, salt=1)
        bundle = DataBundle("synthetic", train, val, classes, 3, size)
    elif config.data_path:
        root = config.data_path
        if not os.path.isdir(root):
            raise FileNotFoundError(f"--data-path {root!r} does not exist or is not a directory")
        for split in ("train", "val"):
            if not os.path.isdir(os.path.join(root, split)):
                raise FileNotFoundError(f"--data-path {root!r} has no {split}/ folder: expected the ImageFolder "
                                        f"layout {root}/train/<class>/*.JPEG and {root}/val/<class>/*.JPEG")
        size = config.input_size or 224
        train_samples, classes = scan_image_folder(os.path.join(root, "train"))
        val_samples, val_classes = scan_image_folder(os.path.join(root, "val"))
        extra = sorted(set(val_classes) - set(classes))
        if extra:
            raise ValueError(f"{root}/val has classes missing from {root}/train: {extra}")
        index = {c: i for i, c in enumerate(classes)}
        val_samples = [(p, index[val_classes[label]]) for p, label in val_samples]
        if config.strict_data:
            # Every file is checked before any training: a bad one fails the run at once, not
            # after hours of training when the sampler reaches it.
            paths = [p for p, _ in train_samples] + [p for p, _ in val_samples]
            bad = verify_images(paths, threads=max(1, config.num_workers or os.cpu_count() or 1))
            if bad:
                raise UnreadableImageError(
                    f"--strict-data: {len(bad)} of {len(paths)} images cannot be read: {'; '.join(bad[:5])}"
                    + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
                    + " (remove or replace them, or drop --strict-data to skip unreadable images)")
        train_tf = T.train_transform(size, config.aa, config.color_jitter, config.train_interpolation)
        train = ImageFolderDataset(train_samples, classes, train_tf, strict=config.strict_data)
        val = ImageFolderDataset(val_samples, classes, T.eval_transform(size), strict=config.strict_data)
        if config.nb_classes is not None and config.nb_classes != len(classes):
            raise ValueError(f"--nb_classes {config.nb_classes} but {root}/train has {len(classes)} classes")
        bundle = DataBundle("imagefolder", train, val, len(classes), 3, size)
    else:
        if config.input_size not in (None, 8):
            raise ValueError(f"--input-size: the digits are 8x8 images; got {config.input_size}")
        x_train, y_train, x_val, y_val = load_digits_split()
        normalize = digits_normalize(x_train)
        train = DigitsDataset(x_train, y_train, T.Compose([T.RandomShift(config.digits_shift), normalize]))
        val = DigitsDataset(x_val, y_val, normalize)
        bundle = DataBundle("digits", train, val, 10, 1, 8)
    if config.sampling_ratio < 1.0:
        bundle.train = _Subset(bundle.train, subsample_per_class(bundle.train.targets, config.sampling_ratio,
                                                                 seed=config.seed))
    return bundle


def sample_images(data_path: Optional[str] = None, num_images: int = 32, img_size=(8, 8),
                  in_chans: int = 1) -> torch.Tensor:
    """(num_images, in_chans, H, W) float32 images to look at a model with, as its evaluation sees them.

    From an ImageFolder directory (its ``val/`` part if it has one; the training code's scan and
    extensions), picks spread evenly over the sorted files so that every class shows, each through
    the evaluation transform at ``img_size`` (an int or (H, W)); or, with no ``data_path``, the
    first validation digits of the training split, normalised as training normalises them. Images
    whose channels differ from ``in_chans`` are repeated (grey to colour) or averaged (colour to
    grey); images of another size are resized bilinearly. A picked file that cannot be decoded
    raises ValueError naming it.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1; got {num_images}")
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if data_path is None:
        x_train, _, x_val, _ = load_digits_split()
        x = digits_normalize(x_train)(x_val[:num_images])
    else:
        if not os.path.isdir(data_path):
            raise FileNotFoundError(f"--data-path {str(data_path)!r} does not exist or is not a directory")
        root = os.path.join(data_path, "val") if os.path.isdir(os.path.join(data_path, "val")) else data_path
        samples, classes = scan_image_folder(root)
        picks = samples[::max(len(samples) // num_images, 1)][:num_images]
        images = ImageFolderDataset(picks, classes, T.eval_transform(size))
        loaded = [images[i] for i in range(len(images))]
        bad = [path for _, _, path in loaded if path is not None]
        if bad:
            raise ValueError(f"{len(bad)} of the {len(picks)} images picked cannot be read: "
                             + ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else ""))
        x = torch.stack([img for img, _, _ in loaded])
    if x.shape[1] != in_chans:
        if x.shape[1] == 1:
            x = x.expand(-1, in_chans, -1, -1).contiguous()
        elif in_chans == 1:
            x = x.mean(1, keepdim=True)
        else:
            raise ValueError(f"images have {x.shape[1]} channels; the model takes {in_chans}")
    if tuple(x.shape[-2:]) != size:
        x = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return x
