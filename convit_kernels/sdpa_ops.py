"""The ``"sdpa"`` backend: GPSA from PyTorch's own attention plus one batch-shared positional op.

GPSA splits exactly into pieces that every PyTorch device already runs well::

    out = o_c + s * (o_p - o_c)                      (torch.lerp, s = sigmoid(gating))
    o_c = scaled_dot_product_attention(q, k, v, scale=scale)          content branch, (B, H, N, D)
    o_p = P @ v,  P[h] = softmax_j(pos_weight[h] . r_ij)              positional branch, P is (H, N, N)

The content branch and its backward are SDPA's (FlashAttention / cuDNN / memory-efficient kernels on
GPUs, the flash CPU kernel on CPUs). The positional branch is the op
``convit_kernels::gpsa_positional`` (``torch.library.custom_op`` with ``register_autograd``, so
``torch.compile(fullgraph=True)`` traces through it on any device). P does not depend on the batch,
so the op never forms a (B, H, N, N) tensor, forward or backward: with g the gradient reaching o_p,
and the batch folded into the columns (``(H, N, B*D)`` views of v and g),

    dP[h]   = g_h @ v_h^T                       one bmm over the concatenated (B*D) axis, (H, N, N)
    dZ      = P * (dP - rowsum(P * dP))         the softmax backward, (H, N, N)
    dw[h]   = sum_ij dZ[h, i, j] r_ij           three (H, N, N) products summed over i, j
    dv      = P^T @ g  (added by autograd to SDPA's dv)
    dbias   = 0 exactly (pos_bias cancels inside the softmax; see zero_bias_grad)

P is computed and kept in float32 (float64 for float64 inputs); the two matmuls with v run in v's
dtype. r_ij comes from ``reference.relative_indices``, the single definition of the grid offsets.

Determinism: the positional op is deterministic (plain matmuls and reductions). SDPA's backward on a
GPU may use atomics; under ``torch.use_deterministic_algorithms(True)`` PyTorch picks a deterministic
SDPA kernel or raises.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .api import register_script_impl
from .backends import Backend, register_backend
from .reference import relative_indices
from .zero_bias_grad import with_zero_bias_grad

__all__ = ["gpsa_sdpa", "positional_probs", "DEVICE_TYPES"]

# Every device type with an SDPA implementation in PyTorch ("meta" gives shapes without data).
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu", "hpu", "npu", "privateuseone", "meta")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def positional_probs(pos_weight: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """P = softmax_j(pos_weight[h] . r_ij), shape (H, N, N), in pos_weight's dtype (fp32 or fp64).

    ``pos_bias`` is left out: it adds a constant to every logit of a row and cancels. The logits are
    three broadcast products, not a matmul, so autocast cannot lower them to bf16/fp16 (their size,
    up to |w . r| ~ 10^2, would lose whole units there), and no temporary exceeds (H, N, N).
    """
    rel = relative_indices(rows, cols, device=pos_weight.device, dtype=pos_weight.dtype)  # (N, N, 3)
    logits = rel[..., 0] * pos_weight[:, 0, None, None]
    for c in (1, 2):
        logits = logits + rel[..., c] * pos_weight[:, c, None, None]
    return logits.softmax(dim=-1)


def _heads_major(x: torch.Tensor) -> torch.Tensor:
    """(B, H, N, D) -> (H, N, B*D): the batch folded into the columns (a copy)."""
    B, H, N, D = x.shape
    return x.permute(1, 2, 0, 3).reshape(H, N, B * D)


def _from_heads_major(y: torch.Tensor, B: int, D: int) -> torch.Tensor:
    """(H, N, B*D) -> (B, H, N, D), a view laid out as (H, N, B, D)."""
    H, N, _ = y.shape
    return y.view(H, N, B, D).permute(2, 0, 1, 3)


@torch.library.custom_op("convit_kernels::gpsa_positional", mutates_args=())
def gpsa_positional(v: torch.Tensor, pos_weight: torch.Tensor, rows: int,
                    cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The positional branch: ``(P @ v, P)``.

    v: (B, H, N, D), any float dtype. pos_weight: (H, 3), float32 (float64 for float64 v). Returns
    o_p (B, H, N, D) in v's dtype, laid out as (H, N, B, D), and P (H, N, N) in pos_weight's dtype
    (saved for the backward; not differentiable). No pos_bias: it cancels (its zero gradient comes
    from ``zero_bias_grad.with_zero_bias_grad``).
    """
    B, H, N, D = v.shape
    probs = positional_probs(pos_weight, rows, cols)
    out = torch.bmm(probs.to(v.dtype), _heads_major(v))
    return _from_heads_major(out, B, D), probs


@gpsa_positional.register_fake
def _(v, pos_weight, rows, cols):
    B, H, N, D = v.shape
    out = v.new_empty((H, N, B, D)).permute(2, 0, 1, 3)
    return out, pos_weight.new_empty((H, N, N))


def _setup_context(ctx, inputs, output):
    v, pos_weight, rows, cols = inputs
    ctx.save_for_backward(v, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.grid = (rows, cols)
    ctx.w_dtype = pos_weight.dtype


def _backward(ctx, grad_out, _grad_probs):
    v, probs = ctx.saved_tensors
    B, H, N, D = v.shape
    w_dtype = ctx.w_dtype
    g = _heads_major(grad_out.to(v.dtype))  # (H, N, B*D)
    dv = dw = None
    if ctx.needs_input_grad[0]:
        dv = _from_heads_major(torch.bmm(probs.to(v.dtype).transpose(1, 2), g), B, D)
    if ctx.needs_input_grad[1]:
        dP = torch.bmm(g, _heads_major(v).transpose(1, 2)).to(probs.dtype)  # (H, N, N), summed over the batch
        dZ = probs * (dP - (probs * dP).sum(dim=-1, keepdim=True))
        rel = relative_indices(*ctx.grid, device=v.device, dtype=probs.dtype)
        # Products and sums, not a matmul: immune to autocast; temporaries of (H, N, N).
        dw = torch.stack([(dZ * rel[..., c]).sum(dim=(1, 2)) for c in range(3)], dim=1).to(w_dtype)
    return dv, dw, None, None


gpsa_positional.register_autograd(_backward, setup_context=_setup_context)


def gpsa_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos_weight: torch.Tensor,
              pos_bias: torch.Tensor, gating: torch.Tensor, rows: int, cols: int, scale: float) -> torch.Tensor:
    """GPSA for ``gpsa_attention(..., backend="sdpa")`` (arguments already validated there); scriptable.

    q, k, v: (B, H, N, D), float64/32/16 or bfloat16; pos_weight (H, 3), pos_bias and gating (H,).
    Returns (B, H, N, D) in q's dtype, differentiable in all six inputs.
    """
    acc = _acc_dtype(q.dtype)
    content = F.scaled_dot_product_attention(q, k, v, scale=scale)
    positional, _ = torch.ops.convit_kernels.gpsa_positional(v, pos_weight.to(acc), rows, cols)
    gate = torch.sigmoid(gating.to(acc)).to(q.dtype).view(1, -1, 1, 1)
    return with_zero_bias_grad(torch.lerp(content, positional, gate), pos_bias)


def _probe(dev: str) -> tuple[bool, str]:
    if not hasattr(F, "scaled_dot_product_attention"):
        return False, f"torch {torch.__version__} has no F.scaled_dot_product_attention (needs torch >= 2.1)"
    if dev == "cuda" and not torch.cuda.is_available():
        return False, "torch.cuda.is_available() is False"
    if dev == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        return False, "torch.backends.mps.is_available() is False"
    if dev == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        return False, "torch.xpu.is_available() is False"
    return True, ""


def _auto_rank(dev: str):
    # Every non-CPU device: the fastest path verified there until a fused kernel has run on a GPU
    # (the CUDA/Triton opt-ins rank above it). On CPU below the fused "cpu" kernel (10) and above
    # the reference (0), so it is the CPU fallback when the C++ extension is missing.
    return 5 if dev == "cpu" else 20


register_script_impl("sdpa", gpsa_sdpa)
register_backend(
    Backend(
        name="sdpa",
        fn=gpsa_sdpa,
        device_types=DEVICE_TYPES,
        probe=_probe,
        auto_rank=_auto_rank,
    )
)
