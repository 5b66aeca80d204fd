"""ConViT: Vision Transformers with soft convolutional inductive biases.

d'Ascoli, Touvron, Leavitt, Morcos, Biroli, Sagun, "ConViT: Improving Vision Transformers with
Soft Convolutional Inductive Biases", ICML 2021 (https://arxiv.org/abs/2103.10697).

Reads top to bottom: layers, the two attention kinds (GPSA, MHSA), the block, the model, then the
registered variants of the paper's Table 1. Parameter names and shapes follow the official code
exactly, so official and timm checkpoints load with ``strict=True``; GPSA keeps no buffer (the
fused kernels form relative positions from row/column indices).

Analysis of a trained model (nonlocality, attention centres, the inputs each layer sees) lives in
``convit.locality``, which reads this module and is never imported by it at load time; the
official ``get_attention_map`` methods below are thin calls into it.

Export: every module here traces with ``torch.fx`` (GPSA's kernel call is an FX leaf function, so
no per-call check on tensor values reaches the tracer), scripts with ``torch.jit.script`` and
exports with ``torch.export`` and ``torch.onnx.export(dynamo=True)``; a swapped timm ConViT too.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from convit_kernels import gpsa_attention
from convit_kernels.backends import KNOWN_BACKENDS
from convit_kernels.reference import gpsa_attention_probs

__all__ = ["PatchEmbed", "Mlp", "DropPath", "GPSA", "MHSA", "Block", "ConViT", "create_model",
           "list_models", "MODEL_CONFIGS"]


def _pair(x) -> Tuple[int, int]:
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"expected an int or a (height, width) pair; got {x!r}")
        return int(x[0]), int(x[1])
    return int(x), int(x)


def _check_backend_name(backend: str) -> str:
    if backend != "auto" and backend not in KNOWN_BACKENDS:
        raise ValueError(f"gpsa_backend must be 'auto' or one of {list(KNOWN_BACKENDS)}; got {backend!r}")
    return backend


def _check_image_size(x: torch.Tensor, img_size: Tuple[int, int]) -> torch.Tensor:
    """``x`` itself, if it is a batch of ``img_size`` images; an FX leaf (its check reads x's shape)."""
    if x.dim() != 4 or x.shape[-2] != img_size[0] or x.shape[-1] != img_size[1]:
        raise ValueError(f"expected images of shape (B, C, {img_size[0]}, {img_size[1]}); got {x.shape}")
    return x


torch.fx.wrap("_check_image_size")


class PatchEmbed(nn.Module):
    """Image to patch embeddings: (B, C, H, W) -> (B, rows * cols, embed_dim), patches row-major."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        self.img_size = _pair(img_size)
        self.patch_size = _pair(patch_size)
        if any(i % p for i, p in zip(self.img_size, self.patch_size)):
            raise ValueError(f"img_size {self.img_size} must be divisible by patch_size {self.patch_size}")
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x):
        x = _check_image_size(x, self.img_size)
        return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features, act_layer=nn.GELU, drop=0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: drops whole residual branches per sample, rescaling the kept ones."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty([x.shape[0]] + [1] * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self):
        return f"drop_prob={self.drop_prob}"


def _token_grid(n: int, grid_size: Optional[Tuple[int, int]]) -> Tuple[int, int]:
    """The (rows, cols) grid of n tokens: ``grid_size`` checked, or the square grid when it is None."""
    if grid_size is not None:
        rows, cols = grid_size
        if rows * cols != n:
            raise ValueError(f"GPSA got {n} tokens but its grid_size ({rows}, {cols}) has {rows * cols}")
        return rows, cols
    side = int(round(math.sqrt(n)))
    if side * side != n:
        raise ValueError(f"GPSA got {n} tokens, not a square grid: set its grid_size=(rows, cols)")
    return side, side


def gpsa_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos_weight: torch.Tensor, pos_bias: torch.Tensor,
              gating: torch.Tensor, grid_size: Optional[Tuple[int, int]], scale: float,
              backend: str) -> torch.Tensor:
    """GPSA's kernel call: ``gpsa_attention`` on the grid of q's N tokens (``grid_size``, or square).

    An FX leaf (``torch.fx.wrap`` below): tracers record one call here instead of tracing the
    argument checks and the backend dispatch, which read tensor shapes and devices. Scriptable.
    """
    grid = _token_grid(q.shape[2], grid_size)
    return gpsa_attention(q, k, v, pos_weight, pos_bias, gating, grid, scale, backend)


def gpsa_probs_call(q: torch.Tensor, k: torch.Tensor, pos_weight: torch.Tensor, pos_bias: torch.Tensor,
                    gating: torch.Tensor, grid_size: Optional[Tuple[int, int]], scale: float) -> torch.Tensor:
    """The mixed attention (B, H, N, N) of the official code on q's token grid; an FX leaf, scriptable."""
    grid = _token_grid(q.shape[2], grid_size)
    return gpsa_attention_probs(q, k, pos_weight, pos_bias, gating, grid, scale)


torch.fx.wrap("gpsa_call")
torch.fx.wrap("gpsa_probs_call")


class GPSA(nn.Module):
    """Gated positional self-attention, computed by ``convit_kernels.gpsa_attention``.

    Input (B, N, dim) over the N patch tokens of a ``grid_size`` grid (set by the model; a GPSA
    built alone assumes a square grid). ``backend`` is any ``gpsa_attention`` backend name.
    The forward has no Python branch on tensor values: it traces with ``torch.fx`` (the kernel
    call, ``gpsa_call``, is a leaf), scripts with ``torch.jit.script`` and exports.
    """

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0,
                 locality_strength=1.0, use_local_init=True, grid_size=None, backend="auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.dim = dim
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.qk = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.pos_proj = nn.Linear(3, num_heads)
        self.proj_drop = nn.Dropout(proj_drop)
        self.locality_strength = locality_strength
        self.gating_param = nn.Parameter(torch.ones(num_heads))
        self.grid_size = None if grid_size is None else _pair(grid_size)  # a tuple, for TorchScript
        self.backend = _check_backend_name(backend)
        self.apply(_init_weights)
        if use_local_init:
            self.local_init(locality_strength)

    def _grid(self, n: int) -> Tuple[int, int]:
        return _token_grid(n, self.grid_size)

    def _qkv(self, x):
        B, N, C = x.shape
        # unbind, not qk[0] / qk[1]: its backward stacks the two gradients once, where each index's
        # backward would zero-fill a full (2, B, H, N, D) gradient and the two be added.
        q, k = self.qk(x).reshape(B, N, 2, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        v = self.v(x).reshape(B, N, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        return q, k, v

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self._qkv(x)
        backend = self.backend
        if self.training and self.attn_drop.p > 0:
            # Attention dropout needs the probabilities, which the fused kernels never form.
            if backend != "auto" and backend != "reference":
                raise ValueError(f"attn_drop > 0 in training needs backend 'reference' or 'auto'; got '{backend}'")
            attn = self.attn_drop(gpsa_probs_call(q, k, self.pos_proj.weight, self.pos_proj.bias,
                                                  self.gating_param, self.grid_size, self.scale))
            out = attn @ v
        else:
            out = gpsa_call(q, k, v, self.pos_proj.weight, self.pos_proj.bias, self.gating_param, self.grid_size,
                            self.scale, backend)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))

    def get_attention(self, x):
        """The mixed attention (B, H, N, N) of the official code (eager, for analysis)."""
        q, k, _ = self._qkv(x)
        return gpsa_probs_call(q, k, self.pos_proj.weight, self.pos_proj.bias, self.gating_param, self.grid_size,
                               self.scale)

    def get_attention_map(self, x, return_map=False):
        """Per-head nonlocality (H,) on ``x``; with ``return_map`` also the batch-mean attention (H, N, N).

        The official method, kept for code written against it; the metric is
        ``convit.locality.attention_map_nonlocality`` (imported on call: see that module).
        """
        from .locality import attention_map_nonlocality

        return attention_map_nonlocality(self.get_attention(x), self._grid(x.shape[1]), return_map)

    @torch.no_grad()
    def local_init(self, locality_strength=1.0):
        """The official local initialisation: v = identity, head h = h1 + k * h2 centred on
        (dx, dy) = (h2 - c, h1 - c) with k = int(sqrt(H)), c its centre, strength ``locality_strength``."""
        self.v.weight.copy_(torch.eye(self.dim))
        kernel_size = int(self.num_heads ** 0.5)
        center = (kernel_size - 1) / 2 if kernel_size % 2 == 0 else kernel_size // 2
        for h1 in range(kernel_size):
            for h2 in range(kernel_size):
                position = h1 + kernel_size * h2
                self.pos_proj.weight[position, 2] = -1
                self.pos_proj.weight[position, 1] = 2 * (h1 - center)
                self.pos_proj.weight[position, 0] = 2 * (h2 - center)
        self.pos_proj.weight.mul_(locality_strength)


class MHSA(nn.Module):
    """Plain multi-head self-attention on ``F.scaled_dot_product_attention``."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.0, proj_drop=0.0, **kwargs):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.apply(_init_weights)

    def _qkv(self, x):
        B, N, C = x.shape
        return self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self._qkv(x)
        dropout = self.attn_drop.p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=self.scale)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, C)))

    def get_attention(self, x):
        """Attention probabilities (B, H, N, N) over all tokens (eager, for analysis)."""
        q, k, _ = self._qkv(x)
        return ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)

    def get_attention_map(self, x, return_map=False):
        """Per-head nonlocality (H,) over the patch tokens (the last N - 1 if a class token leads).

        The official method, kept for code written against it; the metric is
        ``convit.locality.attention_map_nonlocality`` (imported on call: see that module).
        """
        from .locality import attention_map_nonlocality

        return attention_map_nonlocality(self.get_attention(x), None, return_map)


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, qk_scale=None, drop=0.0, attn_drop=0.0,
                 drop_path=0.0, act_layer=nn.GELU, norm_layer=nn.LayerNorm, use_gpsa=True, **kwargs):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.use_gpsa = use_gpsa
        attn_cls = GPSA if use_gpsa else MHSA
        if not use_gpsa:
            kwargs = {}
        self.attn = attn_cls(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                             attn_drop=attn_drop, proj_drop=drop, **kwargs)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def _init_weights(m):
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class ConViT(nn.Module):
    """ConViT: a ViT whose first ``local_up_to_layer`` blocks use GPSA.

    ``embed_dim`` is the total width (the official code multiplies a per-head width by
    ``num_heads``; the registered variants below give the total). ``img_size`` may be an int or
    (height, width); GPSA then works on the (rows, cols) patch grid. The class token joins after
    the last GPSA block. ``gpsa_backend`` picks the GPSA kernel (see ``convit_kernels``).
    """

    def __init__(self, img_size: Union[int, Sequence[int]] = 224, patch_size=16, in_chans=3, num_classes=1000,
                 embed_dim=432, depth=12, num_heads=9, mlp_ratio=4.0, qkv_bias=False, qk_scale=None,
                 drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0, local_up_to_layer=10,
                 locality_strength=1.0, use_pos_embed=True, gpsa_backend="auto",
                 norm_layer: Callable[..., nn.Module] = None):
        super().__init__()
        if not 0 <= local_up_to_layer <= depth:
            raise ValueError(f"local_up_to_layer must be in [0, depth={depth}]; got {local_up_to_layer}")
        norm_layer = norm_layer or (lambda d: nn.LayerNorm(d, eps=1e-6))
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.local_up_to_layer = local_up_to_layer
        self.locality_strength = locality_strength
        self.use_pos_embed = use_pos_embed
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_drop = nn.Dropout(p=drop_rate)
        if use_pos_embed:
            self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, embed_dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        else:
            self.register_parameter("pos_embed", None)  # not in the state dict; None for TorchScript
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # stochastic depth decay rule
        gpsa_kwargs = dict(locality_strength=locality_strength, grid_size=self.patch_embed.grid_size,
                           backend=_check_backend_name(gpsa_backend))
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, qk_scale, drop_rate, attn_drop_rate, dpr[i],
                  norm_layer=norm_layer, use_gpsa=i < local_up_to_layer, **gpsa_kwargs)
            for i in range(depth)
        ])
        self.norm = norm_layer(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_weights)
        for m in self.modules():
            if isinstance(m, GPSA):
                m.local_init(locality_strength)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"pos_embed", "cls_token"}

    __jit_unused_properties__ = ["gpsa_backend"]

    @property
    def gpsa_backend(self):
        return next((m.backend for m in self.modules() if isinstance(m, GPSA)), None)

    def forward_features(self, x):
        B = x.shape[0]
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        x = self.pos_drop(x)
        cls_tokens = self.cls_token.expand(B, -1, -1)
        for u, blk in enumerate(self.blocks):
            if u == self.local_up_to_layer:
                x = torch.cat((cls_tokens, x), dim=1)
            x = blk(x)
        if self.local_up_to_layer == len(self.blocks):
            x = torch.cat((cls_tokens, x), dim=1)
        return self.norm(x)[:, 0]

    def forward(self, x):
        return self.head(self.forward_features(x))


# Table 1 of the paper: embed dim = heads x 48, "plus" = heads x 64; 12 blocks, 10 GPSA.
MODEL_CONFIGS = {
    "convit_tiny": dict(num_heads=4, embed_dim=192),
    "convit_tiny_plus": dict(num_heads=4, embed_dim=256),
    "convit_small": dict(num_heads=9, embed_dim=432),
    "convit_small_plus": dict(num_heads=9, embed_dim=576),
    "convit_base": dict(num_heads=16, embed_dim=768),
    "convit_base_plus": dict(num_heads=16, embed_dim=1024),
}


def list_models() -> list[str]:
    return list(MODEL_CONFIGS)


def create_model(name: str, **overrides) -> ConViT:
    """Build a registered variant; keyword arguments override the ConViT constructor's.

    >>> model = create_model("convit_small", gpsa_backend="auto", drop_path_rate=0.1)
    """
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODEL_CONFIGS)}")
    kwargs = dict(patch_size=16, depth=12, mlp_ratio=4.0, qkv_bias=False, local_up_to_layer=10,
                  locality_strength=1.0, use_pos_embed=True)
    kwargs.update(MODEL_CONFIGS[name])
    kwargs.update(overrides)
    return ConViT(**kwargs)
