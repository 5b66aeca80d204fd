"""Locality of a ConViT (d'Ascoli et al., 2021, section 4): one home for the analysis of attention.

- ``nonlocality``: the attention-weighted mean query-key distance, in patches, per head;
  ``attention_map_nonlocality``: the same metric as the official ``get_attention_map`` computes it.
- ``patch_attention``: attention restricted to the patch tokens (a leading class token dropped, the
  rows renormalised), the form every metric here reads.
- ``layer_inputs``: what each block's attention sees in the model's own forward pass.
- ``attention_centers``: centre and locality strength of a positional head, from ``pos_proj``.
- ``layer_locality_stats``: the per-layer fields of the official training log.
- ``gpsa_maps``: a GPSA layer's positional, content and mixed attention, from the reference.

Imports run one way: this module reads the model (it imports ``convit.models``) and
``convit.models`` never imports it at module load. The official methods ``GPSA.get_attention_map``
and ``MHSA.get_attention_map`` stay on the modules for code written against the official
repository, as thin calls that import ``attention_map_nonlocality`` from here when first called;
by then both modules are loaded, so there is no import cycle, and the metric has this one home.
"""
from __future__ import annotations

import math

import torch

from convit_kernels.reference import gpsa_attention_probs, relative_indices

from .models import GPSA

__all__ = ["nonlocality", "grid_distances", "patch_attention", "attention_map_nonlocality", "layer_inputs",
           "attention_centers", "layer_locality_stats", "gpsa_maps"]


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


def patch_attention(attn: torch.Tensor, n_patches: int) -> torch.Tensor:
    """Attention (..., N, N) restricted to the last ``n_patches`` tokens, the patches.

    With N == n_patches it is ``attn`` itself. Otherwise the leading tokens (the class token) are
    dropped as queries and as keys and each row is renormalised to sum to one, so that the result
    is again a distribution over the patches.
    """
    if attn.shape[-1] == n_patches:
        return attn
    attn = attn[..., -n_patches:, -n_patches:]
    return attn / attn.sum(-1, keepdim=True)


def _square_grid(n_tokens: int):
    """(side, side) of the patch grid of ``n_tokens`` tokens: all of them, or all but a leading class token."""
    for n in (n_tokens, n_tokens - 1):
        side = math.isqrt(max(n, 0))
        if n >= 1 and side * side == n:
            return side, side
    raise ValueError(f"{n_tokens} tokens are neither a square grid of patches nor a class token and one: "
                     "pass grid_size=(rows, cols)")


def attention_map_nonlocality(attn: torch.Tensor, grid_size=None, return_map: bool = False):
    """The metric of the official ``get_attention_map``: per-head nonlocality of the batch-mean map.

    ``attn``: (B, H, N, N) attention over all N tokens. ``grid_size``: (rows, cols) of the patch
    tokens, the last ``rows * cols`` of the N; None for a square grid of all N tokens or, when N is
    not a square, of the N - 1 after a leading class token. Returns the nonlocality (H,) in
    ``attn``'s dtype and, with ``return_map``, also the batch-mean attention over the patches
    (H, P, P), P = rows * cols (rows renormalised when a class token was dropped).
    """
    attn_map = attn.mean(0)
    rows, cols = _square_grid(attn_map.shape[-1]) if grid_size is None else grid_size
    attn_map = patch_attention(attn_map, rows * cols)
    dist = nonlocality(attn_map, (rows, cols)).to(attn_map.dtype)
    return (dist, attn_map) if return_map else dist


@torch.no_grad()
def layer_inputs(model, images: torch.Tensor, gpsa_only: bool = False) -> dict:
    """The input (B, N, dim) of each block's attention in one eval-mode forward pass of ``images``.

    Returns ``{layer: x}`` in block order; with ``gpsa_only``, only the GPSA layers. The model's
    training mode is restored afterwards, and the capturing hooks removed, even if the pass fails.
    """
    captured, hooks = {}, []
    was_training = model.training
    try:
        for layer, block in enumerate(model.blocks):
            if gpsa_only and not isinstance(block.attn, GPSA):
                continue
            hooks.append(block.attn.register_forward_pre_hook(
                lambda module, args, layer=layer: captured.__setitem__(layer, args[0])))
        model.eval()
        model(images)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return captured


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
    rows, cols = model.patch_embed.grid_size
    stats = {"nonlocality": {}, "distances": {}, "gating_params": {}}
    for layer, x in layer_inputs(model, images).items():
        attn_mod = model.blocks[layer].attn
        attn = patch_attention(attn_mod.get_attention(x), rows * cols)
        stats["nonlocality"][layer] = nonlocality(attn, (rows, cols)).tolist()
        if isinstance(attn_mod, GPSA):
            stats["distances"][layer] = attention_centers(attn_mod.pos_proj.weight)[1].tolist()
            stats["gating_params"][layer] = attn_mod.gating_param.detach().double().tolist()
    return stats


def gpsa_maps(attn: GPSA, x: torch.Tensor) -> dict:
    """Attention maps of a GPSA layer on its input ``x`` (B, N, C): {"positional": (1, H, N, N)
    (it does not depend on the input), "content": (B, H, N, N), "mixed": (B, H, N, N)}.

    All three come from the reference ``gpsa_attention_probs``: the gate at +inf gives the purely
    positional softmax, at -inf the purely content one, and the layer's own gate the mixture.
    """
    q, k, _ = attn._qkv(x)
    grid = attn._grid(x.shape[1])
    w, b, g = attn.pos_proj.weight, attn.pos_proj.bias, attn.gating_param
    inf = torch.full_like(g, math.inf)
    return {"positional": gpsa_attention_probs(q[:1], k[:1], w, b, inf, grid, attn.scale),  # batch-invariant
            "content": gpsa_attention_probs(q, k, w, b, -inf, grid, attn.scale),
            "mixed": gpsa_attention_probs(q, k, w, b, g, grid, attn.scale)}
