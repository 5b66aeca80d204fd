"""Which images each rank sees, in which order, with which augmentation seed.

- ``TrainSampler``: a seeded shuffle per epoch, split across ranks; with ``repeats=3`` it is the
  repeated augmentation sampler of DeiT (every image three times, the copies on consecutive
  positions of the global order, so on different ranks under DDP, each augmented differently).
- ``EvalSampler``: rank r takes images r, r + W, r + 2W, ...: no padding, no duplicates, so summed
  counts reduced across ranks are exact.
- ``BatchPlan``: the batches of one epoch, from a given batch on (resuming in the middle of an
  epoch), each element ``(index, aug_seed)``; the dataset seeds the image's augmentation with
  ``aug_seed``, which depends only on (seed, epoch, rank, position).
"""
from __future__ import annotations

import math
from typing import Iterator, List, Optional, Tuple

import torch

__all__ = ["mix_seed", "TrainSampler", "EvalSampler", "BatchPlan"]

_MASK = (1 << 63) - 1


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps): nearby inputs give unrelated seeds."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h + (int(p) & 0xFFFFFFFFFFFFFFFF) + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & _MASK


class TrainSampler:
    """Per-epoch training order of one rank.

    The global order is a permutation of ``range(num_samples)`` seeded by (seed, epoch), each
    entry repeated ``repeats`` times in a row, padded by wrapping to a multiple of ``num_replicas``;
    rank r takes positions r, r + W, ... . With repeats > 1 (DeiT's RASampler) each rank then keeps
    the first ``num_samples // W`` entries, so an epoch has as many steps as without repetition.
    """

    def __init__(self, num_samples: int, num_replicas: int = 1, rank: int = 0, seed: int = 0,
                 shuffle: bool = True, repeats: int = 1):
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1; got {num_samples}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas={num_replicas}); got {rank}")
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1; got {repeats}")
        self.num_samples, self.num_replicas, self.rank = num_samples, num_replicas, rank
        self.seed, self.shuffle, self.repeats = seed, shuffle, repeats
        total = num_samples * repeats
        self.padded = math.ceil(total / num_replicas) * num_replicas
        self.per_rank = num_samples // num_replicas if repeats > 1 else self.padded // num_replicas
        if self.per_rank < 1:
            raise ValueError(f"{num_samples} samples cannot be shared by {num_replicas} ranks")

    def indices(self, epoch: int) -> List[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
            order = torch.randperm(self.num_samples, generator=g)
        else:
            order = torch.arange(self.num_samples)
        order = order.repeat_interleave(self.repeats).tolist()
        order += order[:self.padded - len(order)]
        return order[self.rank:self.padded:self.num_replicas][:self.per_rank]

    def __len__(self) -> int:
        return self.per_rank


class EvalSampler:
    """Rank r of W evaluates indices r, r + W, ... (possibly one fewer than other ranks)."""

    def __init__(self, num_samples: int, num_replicas: int = 1, rank: int = 0):
        self.num_samples, self.num_replicas, self.rank = num_samples, num_replicas, rank

    def indices(self, epoch: int = 0) -> List[int]:
        return list(range(self.rank, self.num_samples, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.num_samples, self.num_replicas))


class BatchPlan(torch.utils.data.Sampler):
    """Batches of ``(index, aug_seed)`` for one epoch of ``sampler``, starting at ``start_batch``.

    Usable as a DataLoader ``batch_sampler``. ``drop_last`` drops a final partial batch (training).
    """

    def __init__(self, sampler, batch_size: int, epoch: int = 0, seed: int = 0, rank: int = 0,
                 drop_last: bool = True, start_batch: int = 0):
        self.sampler, self.batch_size, self.epoch, self.seed, self.rank = sampler, batch_size, epoch, seed, rank
        self.drop_last, self.start_batch = drop_last, start_batch

    def num_batches(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __len__(self) -> int:
        return max(0, self.num_batches() - self.start_batch)

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        order = self.sampler.indices(self.epoch)
        for b in range(self.start_batch, self.num_batches()):
            lo = b * self.batch_size
            yield [(idx, mix_seed(self.seed, self.epoch, self.rank, pos))
                   for pos, idx in enumerate(order[lo:lo + self.batch_size], start=lo)]
