"""Locality metrics of ConViT (d'Ascoli et al., 2021, section 4): one home for the math.

- nonlocality: the attention-weighted mean query-key distance, in patches, per head.
- attention centre and locality strength of a positional head, from ``pos_proj``.
"""
from __future__ import annotations

import torch

from convit_kernels.reference import relative_indices

__all__ = ["nonlocality", "grid_distances", "attention_centers", "layer_locality_stats"]


def grid_distances(rows: int, cols: int, device=None) -> torch.Tensor:
    """(N, N) Euclidean distances, in patches, between the patches of a ``rows x cols`` grid."""
    rel = relative_indices(rows, cols, device=device, dtype=torch.float64)
    return rel[..., 2].sqrt()


def nonlocality(attn: torch.Tensor, grid_size) -> torch.Tensor:
    """Per-head nonlocality of attention maps over patch tokens.

    ``attn``: (B, H, N, N) or (H, N, N), rows summing to one. Returns (H,) float64: for each head,
    the mean over queries (and batch) of ``sum_j attn_ij * |pos(j) - pos(i)|``.
    """
    if attn.dim() == 3:
        attn = attn.unsqueeze(0)
    dist = grid_distances(*grid_size, device=attn.device)
    return (attn.double() * dist).sum(-1).mean(dim=(0, 2))


def attention_centers(pos_weight: torch.Tensor):
    """Centre (dx, dy) and locality strength of each positional head, from ``pos_proj.weight`` (H, 3).

    The logit ``w0 dx + w1 dy + w2 (dx^2 + dy^2)`` with ``w2 < 0`` equals
    ``-alpha ((dx - cx)^2 + (dy - cy)^2) + const`` with ``alpha = -w2``, ``cx = -w0 / (2 w2)``,
    ``cy = -w1 / (2 w2)``. Returns (centers (H, 2), distance of each centre from the query (H,),
    alpha (H,)); a head with ``w2 >= 0`` has no centre (inf distance).
    """
    w = pos_weight.detach().double()
    w2 = w[:, 2]
    span = torch.where(w2 < 0, -1.0 / w2, torch.full_like(w2, float("inf")))
    centers = torch.stack([w[:, 0] * span / 2, w[:, 1] * span / 2], dim=-1)
    # 0 * inf is nan for a centreless head with w0 or w1 == 0: its distance is inf by definition.
    distance = torch.where(w2 < 0, centers.norm(dim=-1), torch.full_like(w2, float("inf")))
    return centers, distance, -w2


@torch.no_grad()
def layer_locality_stats(model, images: torch.Tensor) -> dict:
    """Per-layer locality of a ConViT on a batch of images, each layer from its own input.

    (The official code feeds every layer the patch embeddings; here each attention layer sees
    what it sees in the real forward pass.) Returns ``{"nonlocality": {layer: [per head]},
    "distances": {layer: [per head]}, "gating_params": {layer: [per head]}}``, the fields the
    official training log records; distances and gates only for GPSA layers.
    """
    from .models import GPSA

    captured = {}
    hooks = []
    for layer, block in enumerate(model.blocks):
        def hook(module, args, layer=layer):
            captured[layer] = args[0]
        hooks.append(block.attn.register_forward_pre_hook(hook))
    try:
        was_training = model.training
        model.eval()
        model(images)
        model.train(was_training)
    finally:
        for h in hooks:
            h.remove()
    rows, cols = model.patch_embed.grid_size
    n_patches = rows * cols
    stats = {"nonlocality": {}, "distances": {}, "gating_params": {}}
    for layer, block in enumerate(model.blocks):
        attn_mod, x = block.attn, captured[layer]
        if isinstance(attn_mod, GPSA):
            attn = attn_mod.get_attention(x)
        else:
            attn = attn_mod.get_attention(x)[..., -n_patches:, -n_patches:]
            attn = attn / attn.sum(-1, keepdim=True)
        stats["nonlocality"][layer] = nonlocality(attn, (rows, cols)).tolist()
        if isinstance(attn_mod, GPSA):
            stats["distances"][layer] = attention_centers(attn_mod.pos_proj.weight)[1].tolist()
            stats["gating_params"][layer] = attn_mod.gating_param.detach().double().tolist()
    return stats
