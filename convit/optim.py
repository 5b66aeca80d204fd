"""AdamW with the DeiT weight-decay groups, linear lr scaling, and the warm-up + cosine schedule."""
from __future__ import annotations

import math
from typing import Iterable, List

import torch

__all__ = ["param_groups", "scaled_lr", "WarmupCosineSchedule", "create_optimizer"]


def _clean(name: str) -> str:
    # Names seen through DistributedDataParallel ("module.") or torch.compile ("_orig_mod.").
    for prefix in ("module.", "_orig_mod."):
        while name.startswith(prefix):
            name = name[len(prefix):]
    return name


def param_groups(model: torch.nn.Module, weight_decay: float, skip: Iterable[str] = ()) -> List[dict]:
    """Two AdamW groups: decay on weight matrices; none on biases, 1-D parameters (norms, gating)
    and the names in ``skip`` plus ``model.no_weight_decay()`` (pos_embed, cls_token), as timm's
    ``add_weight_decay`` that DeiT uses."""
    inner = getattr(model, "module", model)
    inner = getattr(inner, "_orig_mod", inner)
    skip = set(skip)
    if hasattr(inner, "no_weight_decay"):
        skip |= set(inner.no_weight_decay())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        name = _clean(name)
        if p.ndim <= 1 or name.endswith(".bias") or name in skip:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def scaled_lr(lr: float, global_batch: int) -> float:
    """The linear scaling rule of DeiT: lr x global batch / 512."""
    return lr * global_batch / 512.0


def create_optimizer(model, lr: float, weight_decay: float, eps: float = 1e-8) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, eps=eps)


class WarmupCosineSchedule:
    """timm's CosineLRScheduler as DeiT configures it, at time ``t`` in epochs (may be fractional).

    ``t < warmup``: linear from ``warmup_lr`` to ``base_lr``; then
    ``min_lr + (base_lr - min_lr) (1 + cos(pi t / epochs)) / 2`` (t counted from the start of
    training, warm-up included, as timm does), ``min_lr`` from ``t >= epochs`` on. Per epoch
    (the official default) the loop calls ``step(epoch)`` at each epoch start; with
    ``sched_on_updates`` it calls ``step(epoch + i / steps_per_epoch)`` every step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, base_lr: float, epochs: float, warmup_epochs: float = 5,
                 warmup_lr: float = 1e-6, min_lr: float = 1e-5):
        if epochs <= 0:
            raise ValueError(f"epochs must be > 0; got {epochs}")
        self.optimizer, self.base_lr, self.epochs = optimizer, base_lr, epochs
        self.warmup_epochs, self.warmup_lr, self.min_lr = warmup_epochs, warmup_lr, min_lr
        self.t = 0.0
        self.step(0.0)

    def lr_at(self, t: float) -> float:
        if t < self.warmup_epochs:
            return self.warmup_lr + t * (self.base_lr - self.warmup_lr) / self.warmup_epochs
        if t >= self.epochs:
            return self.min_lr
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1.0 + math.cos(math.pi * t / self.epochs))

    def step(self, t: float) -> float:
        self.t = float(t)
        lr = self.lr_at(self.t)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict:
        return {"t": self.t, "base_lr": self.base_lr, "epochs": self.epochs, "warmup_epochs": self.warmup_epochs,
                "warmup_lr": self.warmup_lr, "min_lr": self.min_lr}

    def load_state_dict(self, state: dict) -> None:
        for key in ("base_lr", "epochs", "warmup_epochs", "warmup_lr", "min_lr"):
            setattr(self, key, state[key])
        self.step(state["t"])
