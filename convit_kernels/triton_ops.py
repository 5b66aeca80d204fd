"""The Triton GPSA kernels as torch ops, and the ``"triton"`` backend.

``convit_kernels::gpsa_fwd_triton`` and ``convit_kernels::gpsa_bwd_triton`` are registered with
``torch.library.triton_op``; every kernel launch inside them goes through ``wrap_triton``, so
``torch.compile`` traces into the kernels instead of breaking the graph, and the fake (meta)
implementation comes for free. ``register_autograd`` connects the two.

Scope: CUDA tensors, or CPU tensors when ``TRITON_INTERPRET=1`` was set before import (Triton's
interpreter; slow, for tests). float32, float16 and bfloat16 (float32 accumulation), D <= 128.
Under the interpreter ``opcheck`` and ``torch.compile`` of these ops fail (fake tensors reach the
interpreter): call them eagerly there (docs/DESIGN.md section 4).
"""
from __future__ import annotations

import os

import torch

from .api import register_script_impl, validate_gpsa_inputs
from .backends import Backend, register_backend
from .zero_bias_grad import with_zero_bias_grad

__all__ = ["gpsa_triton"]

try:
    from . import triton_bwd, triton_fwd
    _IMPORT_ERROR = ""
except Exception as err:  # noqa: BLE001 - a missing or broken triton must leave the package usable
    triton_fwd = triton_bwd = None
    _IMPORT_ERROR = f"triton is not importable: {type(err).__name__}: {err}"

_ACC = torch.float32


def _bnhd_like(t: torch.Tensor) -> torch.Tensor:
    """An empty (B, H, N, D) tensor laid out as contiguous (B, N, H, D), like the kernels' outputs."""
    B, H, N, D = t.shape
    return t.new_empty((B, N, H, D)).transpose(1, 2)



def _probe(dev: str) -> tuple[bool, str]:
    if _IMPORT_ERROR:
        return False, _IMPORT_ERROR
    if dev == "cuda":
        if triton_fwd.INTERPRET:
            return False, "TRITON_INTERPRET=1 was set when convit_kernels was imported: the kernels run on CPU only"
        if not torch.cuda.is_available():
            return False, "no CUDA device is available"
        return True, ""
    if dev == "cpu":
        if triton_fwd.INTERPRET:
            return True, ""
        return False, ("Triton runs on CPU tensors only under its interpreter: set TRITON_INTERPRET=1 "
                       "before importing convit_kernels (slow; meant for tests)")
    return False, f"does not run on {dev!r} tensors"


def _auto_rank(dev: str):
    # Not preferred by "auto" until a GPU run has verified the kernels (issue 6); opt in by env var.
    if dev == "cuda" and os.environ.get("CONVIT_KERNELS_TRUST_TRITON") == "1":
        return 30
    return None


if triton_fwd is not None:
    from torch.library import triton_op, wrap_triton

    @triton_op("convit_kernels::gpsa_fwd_triton", mutates_args=())
    def gpsa_fwd_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos_weight: torch.Tensor,
                        gating: torch.Tensor, rows: int, cols: int, scale: float,
                        block_n: int = 0, split_d: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """GPSA forward: ``(out, lse)``. No pos_bias: it cancels (its zero gradient comes from
        ``zero_bias_grad.with_zero_bias_grad``). block_n > 0 forces the tiled path; split_d
        runs the head dim as two power-of-two chunks (48 = 32 + 16) instead of one masked chunk."""
        if q.device.type == "meta":  # shapes only: meta tensors have no data for the kernels
            return _bnhd_like(q), q.new_empty(q.shape[:3], dtype=_ACC)
        return triton_fwd.gpsa_fwd_launch(q, k, v, pos_weight, gating, rows, cols, scale, block_n, split_d,
                                          wrap_triton)

    @triton_op("convit_kernels::gpsa_bwd_triton", mutates_args=())
    def gpsa_bwd_triton(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        pos_weight: torch.Tensor, gating: torch.Tensor, lse: torch.Tensor, rows: int, cols: int,
                        scale: float, block_n: int = 0, split_d: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """GPSA backward: ``(grad_q, grad_k, grad_v, grad_pos_weight, grad_gating)``."""
        if q.device.type == "meta":
            return (_bnhd_like(q), _bnhd_like(q), _bnhd_like(q), pos_weight.new_empty(pos_weight.shape),
                    gating.new_empty(gating.shape))
        return triton_bwd.gpsa_bwd_launch(grad_out, q, k, v, pos_weight, gating, lse, rows, cols, scale,
                                          block_n, split_d, wrap_triton)

    def _setup_context(ctx, inputs, output):
        q, k, v, pos_weight, gating, rows, cols, scale, block_n, split_d = inputs
        ctx.save_for_backward(q, k, v, pos_weight, gating, output[1])
        ctx.params = (rows, cols, scale, block_n, split_d)

    def _backward(ctx, grad_out, _grad_lse):
        q, k, v, pos_weight, gating, lse = ctx.saved_tensors
        rows, cols, scale, block_n, split_d = ctx.params
        if grad_out.stride(-1) != 1:  # e.g. an expanded gradient of out.sum()
            grad_out = grad_out.contiguous()
        dq, dk, dv, dw, dg = gpsa_bwd_triton(grad_out, q, k, v, pos_weight, gating, lse, rows, cols, scale,
                                             block_n, split_d)
        return dq, dk, dv, dw, dg, None, None, None, None, None

    torch.library.register_autograd("convit_kernels::gpsa_fwd_triton", _backward, setup_context=_setup_context)


def _max_head_dim() -> int:
    # triton_fwd.MAX_HEAD_DIM as a function: TorchScript reads no global ints (checked on import).
    return 128


if triton_fwd is not None and triton_fwd.MAX_HEAD_DIM != _max_head_dim():
    raise ImportError(f"_max_head_dim() must equal triton_fwd.MAX_HEAD_DIM = {triton_fwd.MAX_HEAD_DIM}")


def _gpsa_triton_fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos_weight: torch.Tensor,
                    pos_bias: torch.Tensor, gating: torch.Tensor, rows: int, cols: int, scale: float,
                    block_n: int = 0, split_d: bool = False) -> torch.Tensor:
    D = q.shape[-1]
    if D > _max_head_dim():
        raise ValueError(f"backend='triton' supports head dims D <= {_max_head_dim()}; q has D = {D}")
    out, _ = torch.ops.convit_kernels.gpsa_fwd_triton(
        q, k, v, pos_weight.to(torch.float32), gating.to(torch.float32), rows, cols, scale, block_n, split_d)
    return with_zero_bias_grad(out, pos_bias)


def gpsa_triton(q, k, v, pos_weight, pos_bias, gating, grid_size, scale=None, block_n=0, split_d=False):
    """``gpsa_attention(..., backend="triton")`` with the kernel's path exposed.

    Same arguments and result as ``convit_kernels.gpsa_attention``. ``block_n``: 0 lets the
    autotuner choose (whole-row or tiled configs for N <= 256, tiled beyond); a power of two >= 16
    forces the tiled online-softmax path with that key block, e.g. to test it at a small N.
    ``split_d``: run the head
    dim as two power-of-two chunks (48 = 32 + 16) instead of one masked chunk (see
    ``triton_fwd.head_dim_split``); both give the same results up to rounding.
    """
    rows, cols, scale = validate_gpsa_inputs(q, k, v, pos_weight, pos_bias, gating, grid_size, scale)
    ok, reason = _probe(q.device.type)
    if not ok:
        raise ValueError(f"backend='triton' is not available for {q.device.type} tensors: {reason}")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"backend='triton' supports float32, float16 and bfloat16 q; got {q.dtype}")
    if isinstance(block_n, bool) or not isinstance(block_n, int):
        raise TypeError(f"block_n must be an int; got {type(block_n).__name__}")
    if not isinstance(split_d, bool):
        raise TypeError(f"split_d must be a bool; got {type(split_d).__name__}")
    triton_fwd.choose_path(q.shape[2], block_n)  # validates block_n
    return _gpsa_triton_fn(q, k, v, pos_weight, pos_bias, gating, rows, cols, scale, block_n, split_d)


if triton_fwd is not None:
    register_script_impl("triton", _gpsa_triton_fn)
register_backend(
    Backend(
        name="triton",
        fn=_gpsa_triton_fn,
        device_types=("cuda", "cpu"),
        probe=_probe,
        auto_rank=_auto_rank,
        dtypes=(torch.float32, torch.float16, torch.bfloat16),
    )
)
