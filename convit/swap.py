"""``swap_gpsa``: switch the GPSA layers of any ConViT (ours, timm's, the official) to a backend."""
from __future__ import annotations

import torch.nn as nn

from .models import GPSA, _check_backend_name

__all__ = ["swap_gpsa"]

_GPSA_ATTRS = ("qk", "v", "proj", "pos_proj", "gating_param", "num_heads", "scale")


def _is_foreign_gpsa(m: nn.Module) -> bool:
    return not isinstance(m, GPSA) and all(hasattr(m, a) for a in _GPSA_ATTRS)


def _adopt(m: nn.Module, backend: str, grid_size) -> GPSA:
    """A GPSA that shares the parameters (the very same tensors) of a timm/official GPSA module."""
    new = GPSA.__new__(GPSA)
    nn.Module.__init__(new)
    new.num_heads = m.num_heads
    new.dim = m.qk.in_features
    new.scale = m.scale
    new.locality_strength = getattr(m, "locality_strength", 1.0)
    for name in ("qk", "v", "proj", "pos_proj"):
        setattr(new, name, getattr(m, name))
    new.attn_drop = getattr(m, "attn_drop", nn.Dropout(0.0))
    new.proj_drop = getattr(m, "proj_drop", nn.Dropout(0.0))
    new.gating_param = m.gating_param
    new.grid_size = grid_size
    new.backend = backend
    new.train(m.training)
    return new


def swap_gpsa(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Make every GPSA layer of ``model`` use ``backend``, in place; returns ``model``.

    Our GPSA modules just switch backend. GPSA modules of timm or the official code (recognised by
    their attributes qk, v, proj, pos_proj, gating_param, num_heads, scale) are replaced by ours,
    sharing the same parameter tensors, so the state dict and any optimizer keep working. The
    patch grid comes from ``model.patch_embed.grid_size`` when there is one, else N must be square.
    """
    _check_backend_name(backend)
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    grid = tuple(int(x) for x in grid) if grid is not None else None
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, GPSA):
                child.backend = backend
                swapped += 1
            elif _is_foreign_gpsa(child):
                setattr(parent, name, _adopt(child, backend, grid))
                swapped += 1
    if isinstance(model, GPSA):
        model.backend = backend
        swapped += 1
    if swapped == 0:
        raise ValueError("swap_gpsa found no GPSA layer in model (a module with attributes "
                         f"{', '.join(_GPSA_ATTRS)})")
    return model
