"""The reference GPSA: the official ConViT formulation in eager PyTorch.

This module is the oracle of the project: every test and benchmark imports it, and no other file
re-derives GPSA. It follows the official code (facebookresearch/convit, ``GPSA.get_attention``)
step by step, including what the fused kernels deliberately skip: the (N, N, 3) relative-index
tensor, the positional projection of it for every batch element, and the renormalisation of the
mixed attention by its row sum. It computes in the dtype of ``q`` (what the official model does
when it is cast to that dtype) and is differentiable in all six inputs.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["relative_indices", "gpsa_attention_probs", "gpsa_reference", "gpsa_composed"]


def relative_indices(rows: int, cols: int, device: Optional[torch.device] = None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The official (N, N, 3) relative-position tensor of a ``rows x cols`` patch grid.

    ``r[i, j] = (dx, dy, dx**2 + dy**2)`` with ``dx = col(j) - col(i)``, ``dy = row(j) - row(i)``
    (key minus query) and patches numbered row-major. For a square grid this equals the official
    ``get_rel_indices``; non-square grids use the same definition.
    """
    idx = torch.arange(rows * cols, device=device)
    row, col = idx // cols, idx % cols
    dx = (col[None, :] - col[:, None]).to(dtype)
    dy = (row[None, :] - row[:, None]).to(dtype)
    return torch.stack([dx, dy, dx * dx + dy * dy], dim=-1)


def gpsa_attention_probs(q: torch.Tensor, k: torch.Tensor, pos_weight: torch.Tensor, pos_bias: torch.Tensor,
                         gating: torch.Tensor, grid_size: Tuple[int, int],
                         scale: Optional[float] = None) -> torch.Tensor:
    """The mixed GPSA attention of the official code, shape (B, H, N, N), in ``q``'s dtype.

    ``q, k``: (B, H, N, D); ``pos_weight``: (H, 3); ``pos_bias``, ``gating``: (H,);
    ``grid_size``: (rows, cols) with rows * cols == N.
    """
    B, H, N, D = q.shape
    rows, cols = grid_size
    dtype = q.dtype
    scale = float(D) ** -0.5 if scale is None else scale
    rel = relative_indices(rows, cols, device=q.device, dtype=dtype)
    # The official code projects an expanded (B, N, N, 3) tensor; same values, batch-broadcast.
    pos_score = rel.unsqueeze(0).expand(B, -1, -1, -1) @ pos_weight.to(dtype).t() + pos_bias.to(dtype)
    pos_score = pos_score.permute(0, 3, 1, 2).softmax(dim=-1)
    patch_score = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)
    gate = torch.sigmoid(gating.to(dtype)).view(1, -1, 1, 1)
    attn = (1.0 - gate) * patch_score + gate * pos_score
    return attn / attn.sum(dim=-1, keepdim=True)


def gpsa_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos_weight: torch.Tensor,
                   pos_bias: torch.Tensor, gating: torch.Tensor, grid_size: Tuple[int, int],
                   scale: Optional[float] = None) -> torch.Tensor:
    """Official-semantics GPSA: ``gpsa_attention_probs(...) @ v``, shape (B, H, N, D)."""
    attn = gpsa_attention_probs(q, k, pos_weight, pos_bias, gating, grid_size, scale)
    return attn @ v.to(attn.dtype)


def gpsa_composed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos_weight: torch.Tensor,
                  pos_bias: torch.Tensor, gating: torch.Tensor, grid_size: Tuple[int, int],
                  scale: Optional[float] = None) -> torch.Tensor:
    """The best composed PyTorch formulation, the baseline the fused kernels must beat.

    Content branch with ``F.scaled_dot_product_attention`` (a fused kernel where PyTorch has one),
    positional branch as one batch-shared (H, N, N) softmax multiplied into v, mixed at the output:
    ``(1 - s) * sdpa(q, k, v) + s * softmax(pos) @ v``. Mathematically equal to the reference
    (the row renormalisation of the official code is a no-op), without its (B, H, N, N) tensors.
    """
    B, H, N, D = q.shape
    rows, cols = grid_size
    dtype = q.dtype
    scale = float(D) ** -0.5 if scale is None else scale
    content = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    rel = relative_indices(rows, cols, device=q.device, dtype=acc)
    pos = (rel @ pos_weight.to(acc).t() + pos_bias.to(acc)).permute(2, 0, 1).softmax(dim=-1)  # (H, N, N)
    positional = torch.matmul(pos.to(dtype).unsqueeze(0), v)
    gate = torch.sigmoid(gating.to(acc)).to(dtype).view(1, -1, 1, 1)
    return content + gate * (positional - content)
