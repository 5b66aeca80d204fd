"""The C++ extension's GPSA ops as differentiable torch ops, and the "cpu" and "cuda" backends.

``convit_kernels._C`` declares ``torch.ops.convit_kernels.gpsa_fwd`` and ``gpsa_bwd`` (schemas in
``csrc/gpsa_ops.cpp``) with CPU kernels (``csrc/cpu/``) and, in a CUDA build, CUDA kernels
(``csrc/cuda/``). This module adds what ``torch.compile`` and autograd need (fake implementations
and the backward formula) and registers the backends. Importing it raises ImportError with the
reason when the extension cannot be loaded; ``convit_kernels/__init__`` records that reason.
"""
from __future__ import annotations

import os

import torch

from .api import register_script_impl
from .backends import Backend, register_backend
from .zero_bias_grad import with_zero_bias_grad

try:
    from . import _C  # noqa: F401  (loading the library registers the ops)
except Exception as _err:  # noqa: BLE001
    raise ImportError(
        f"the C++ extension convit_kernels._C could not be loaded ({type(_err).__name__}: {_err}); "
        "build it with `pip install --no-build-isolation -e .`"
    ) from _err

__all__ = ["gpsa_fwd", "gpsa_bwd", "gpsa_extension_op", "built_with_cuda"]

_ops = torch.ops.convit_kernels
gpsa_fwd = _ops.gpsa_fwd
gpsa_bwd = _ops.gpsa_bwd


def built_with_cuda() -> bool:
    """Whether this build of ``convit_kernels._C`` compiled the CUDA kernels."""
    return bool(_ops.built_with_cuda())


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---- torch.compile / FakeTensor support -------------------------------------------------------

def _bnhd_like(t: torch.Tensor) -> torch.Tensor:
    """An empty (B, H, N, D) tensor laid out as contiguous (B, N, H, D), like the kernels' outputs."""
    B, H, N, D = t.shape
    return t.new_empty((B, N, H, D)).transpose(1, 2)


@torch.library.register_fake("convit_kernels::gpsa_fwd")
def _gpsa_fwd_fake(q, k, v, pos_weight, gating, rows, cols, scale):
    B, H, N, _ = q.shape
    return _bnhd_like(q), q.new_empty((B, H, N), dtype=_acc_dtype(q.dtype))


@torch.library.register_fake("convit_kernels::gpsa_bwd")
def _gpsa_bwd_fake(grad_out, q, k, v, pos_weight, gating, lse, rows, cols, scale):
    return (_bnhd_like(q), _bnhd_like(q), _bnhd_like(q), torch.empty_like(pos_weight, memory_format=torch.contiguous_format),
            torch.empty_like(gating, memory_format=torch.contiguous_format))


# ---- autograd -----------------------------------------------------------------------------------

def _gpsa_fwd_setup_context(ctx, inputs, output):
    q, k, v, pos_weight, gating, rows, cols, scale = inputs
    _, lse = output
    ctx.save_for_backward(q, k, v, pos_weight, gating, lse)  # lse only: no (B, H, N, N) tensor is kept
    ctx.grid = (rows, cols, scale)
    ctx.mark_non_differentiable(lse)


def _gpsa_fwd_backward(ctx, grad_out, grad_lse):
    q, k, v, pos_weight, gating, lse = ctx.saved_tensors
    rows, cols, scale = ctx.grid
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    grad_q, grad_k, grad_v, grad_w, grad_g = gpsa_bwd(grad_out, q, k, v, pos_weight, gating, lse, rows, cols, scale)
    return grad_q, grad_k, grad_v, grad_w, grad_g, None, None, None


torch.library.register_autograd("convit_kernels::gpsa_fwd", _gpsa_fwd_backward,
                                setup_context=_gpsa_fwd_setup_context)


def gpsa_extension_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos_weight: torch.Tensor,
                      pos_bias: torch.Tensor, gating: torch.Tensor, rows: int, cols: int,
                      scale: float) -> torch.Tensor:
    """Backend function of "cpu" and "cuda": GPSA through ``torch.ops.convit_kernels.gpsa_fwd``.

    Arguments as validated by ``convit_kernels.validate_gpsa_inputs``; returns (B, H, N, D) in q's
    dtype, a view of contiguous (B, N, H, D) storage. Scriptable (``torch.jit.script``).
    """
    acc = _acc_dtype(q.dtype)
    out, _ = gpsa_fwd(q, k, v, pos_weight.to(acc), gating.to(acc), rows, cols, scale)
    return with_zero_bias_grad(out, pos_bias)


# ---- backends -----------------------------------------------------------------------------------

# Which kernels the loaded library registered: fixed once it is loaded, so asked once (the probes run
# inside gpsa_attention, which torch.compile traces; it cannot trace the dispatcher query).
_HAS_CPU_KERNEL = torch._C._dispatch_has_kernel_for_dispatch_key("convit_kernels::gpsa_fwd", "CPU")
_HAS_CUDA_KERNEL = torch._C._dispatch_has_kernel_for_dispatch_key("convit_kernels::gpsa_fwd", "CUDA")


def _probe_cpu(device_type: str):
    if not _HAS_CPU_KERNEL:
        return False, "convit_kernels._C has no CPU kernel for gpsa_fwd (a broken build?)"
    return True, ""


def _probe_cuda(device_type: str):
    reasons = []
    if not torch.cuda.is_available():
        reasons.append("torch.cuda.is_available() is False")
    if not _HAS_CUDA_KERNEL:
        reasons.append("convit_kernels._C was built without the CUDA kernels (no CUDA torch or nvcc at build "
                       "time; rebuild with FORCE_CUDA=1 where both are present)")
    if os.environ.get("CONVIT_KERNELS_ENABLE_CUDA", "0") != "1":
        reasons.append("the CUDA kernel is not verified on a GPU yet: set CONVIT_KERNELS_ENABLE_CUDA=1 to use it")
    return (not reasons), "; ".join(reasons)


register_script_impl("cpu", gpsa_extension_op)
register_backend(Backend(
    name="cpu",
    fn=gpsa_extension_op,
    device_types=("cpu",),
    probe=_probe_cpu,
    auto_rank=lambda dev: 10 if dev == "cpu" else None,
    dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16),
))

register_backend(Backend(
    name="cuda",
    fn=gpsa_extension_op,
    device_types=("cuda",),
    probe=_probe_cuda,
    auto_rank=None,
))
