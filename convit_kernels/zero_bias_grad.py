"""``pos_bias``'s gradient for every fused backend, by one mechanism: it is exactly zero.

The positional bias adds the same constant to every logit of a row, so it cancels inside the
positional softmax: the fused ops (the C++/CUDA ``gpsa_fwd``, the Triton ``gpsa_fwd_triton``, the
``sdpa`` backend's ``gpsa_positional``) do not take it. ``with_zero_bias_grad`` ties it to their
output through an identity autograd node whose backward returns zeros for it, so autograd (and
``torch.compile``, which traces the node) gives it the exact gradient, 0, instead of None.
"""
from __future__ import annotations

import torch

__all__ = ["with_zero_bias_grad"]


class _ZeroGradFor(torch.autograd.Function):
    """Identity on ``out``; the gradient of ``pos_bias`` is zeros of its shape and dtype."""

    @staticmethod
    def forward(out, pos_bias):
        return out.view_as(out)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pos_bias = inputs[1]
        ctx.bias_meta = (pos_bias.shape, pos_bias.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        shape, dtype = ctx.bias_meta
        return grad_out, grad_out.new_zeros(shape, dtype=dtype)


def with_zero_bias_grad(out: torch.Tensor, pos_bias: torch.Tensor) -> torch.Tensor:
    """``out`` itself (a view), connected to ``pos_bias`` so that its gradient is exactly zero.

    A no-op where ``pos_bias`` needs no gradient or autograd is off, and under TorchScript (which
    cannot run a Python autograd.Function: there ``pos_bias`` gets no gradient).
    """
    if torch.jit.is_scripting():
        return out
    if pos_bias.requires_grad and torch.is_grad_enabled():
        return _ZeroGradFor.apply(out, pos_bias)
    return out
