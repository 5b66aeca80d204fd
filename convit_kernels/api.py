"""``gpsa_attention``: the public, dispatching entry point.

It runs eagerly, under ``torch.compile`` / ``torch.export`` (the backends' ops have fake
implementations), under ``torch.jit.script`` (a scriptable path that calls the same registered
ops, see ``_gpsa_attention_scripted``) and under ``torch.onnx.export(dynamo=True)``, where it
computes the composed formulation (``reference.gpsa_composed``) in standard ops, which the
exporter translates to standard ONNX operators.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .backends import resolve_backend
from .reference import gpsa_composed, gpsa_reference

__all__ = ["gpsa_attention", "validate_gpsa_inputs", "register_script_impl"]

_FLOAT_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _check_tensor(name, t, ndim, shape_doc):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {shape_doc}; got {type(t).__name__}")
    if not t.is_floating_point() or t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float64/32/16 or bfloat16); got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have shape {shape_doc}; got a {t.dim()}-d tensor of shape {tuple(t.shape)}")


def validate_gpsa_inputs(q, k, v, pos_weight, pos_bias, gating, grid_size, scale):
    """Check the arguments of ``gpsa_attention``; return ``(rows, cols, scale)`` resolved.

    Raises TypeError/ValueError naming the offending argument and what was expected.
    """
    _check_tensor("q", q, 4, "(B, H, N, D)")
    B, H, N, D = q.shape
    for name, t in (("k", k), ("v", v)):
        _check_tensor(name, t, 4, f"(B, H, N, D) = {tuple(q.shape)}")
        if t.shape != q.shape:
            raise ValueError(f"{name} must have the shape of q {tuple(q.shape)}; got {tuple(t.shape)}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have the dtype of q ({q.dtype}); got {t.dtype}")
    _check_tensor("pos_weight", pos_weight, 2, f"(H, 3) = ({H}, 3)")
    if tuple(pos_weight.shape) != (H, 3):
        raise ValueError(f"pos_weight must have shape (H, 3) = ({H}, 3); got {tuple(pos_weight.shape)}")
    for name, t in (("pos_bias", pos_bias), ("gating", gating)):
        _check_tensor(name, t, 1, f"(H,) = ({H},)")
        if tuple(t.shape) != (H,):
            raise ValueError(f"{name} must have shape (H,) = ({H},); got {tuple(t.shape)}")
    for name, t in (("k", k), ("v", v), ("pos_weight", pos_weight), ("pos_bias", pos_bias), ("gating", gating)):
        if t.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}); got {t.device}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.numel() and t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dimension (stride 1); got strides {t.stride()}")
    if N == 0 or D == 0 or H == 0:
        raise ValueError(f"q must have H, N and D >= 1; got shape {tuple(q.shape)}")
    if not isinstance(grid_size, (tuple, list)) or len(grid_size) != 2:
        raise TypeError(f"grid_size must be a (rows, cols) pair of ints; got {grid_size!r}")
    rows, cols = grid_size
    if isinstance(rows, bool) or isinstance(cols, bool) or not all(isinstance(x, int) for x in (rows, cols)):
        raise TypeError(f"grid_size must be a (rows, cols) pair of ints; got {grid_size!r}")
    if rows < 1 or cols < 1 or rows * cols != N:
        raise ValueError(f"grid_size (rows, cols) must satisfy rows * cols == N = {N}; got {grid_size!r}")
    if scale is None:
        scale = D ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None; got {type(scale).__name__}")
    elif not (scale == scale and abs(scale) != float("inf")):
        raise ValueError(f"scale must be finite; got {scale}")
    return int(rows), int(cols), float(scale)


def gpsa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos_weight: torch.Tensor,
                   pos_bias: torch.Tensor, gating: torch.Tensor, grid_size: Tuple[int, int],
                   scale: Optional[float] = None, backend: str = "auto") -> torch.Tensor:
    """Gated positional self-attention (ConViT), all heads at once.

    Per head h, with ``s = sigmoid(gating[h])`` and ``r_ij = (dx, dy, dx^2 + dy^2)`` the offset of
    key j from query i on the ``grid_size`` patch grid (row-major patches)::

        out = ((1 - s) softmax(q k^T * scale) + s softmax(r . pos_weight[h] + pos_bias[h])) @ v

    Args:
        q, k, v: (B, H, N, D), float64/float32/float16/bfloat16, one dtype, one device. Any strides
            with the last dimension contiguous (views of a fused projection are fine).
        pos_weight: (H, 3), the ``pos_proj.weight`` of the official GPSA.
        pos_bias: (H,), ``pos_proj.bias``. It cancels inside the softmax: its gradient is zero.
        gating: (H,), the raw ``gating_param`` (not its sigmoid).
        grid_size: (rows, cols), ints with rows * cols == N; non-square grids are allowed.
        scale: the content logit scale; ``None`` means ``D ** -0.5``.
        backend: "auto" (the fastest verified backend for the tensors' device: "cpu" on CPU,
            "sdpa" on every other device unless a fused kernel is opted in), "reference", "cpu",
            "cuda", "triton" or "sdpa". See ``available_backends``, ``backend_status`` and
            ``backend_report``. The choice is made once per (backend, device type, dtype) and
            cached: environment variables that the probes read (``CONVIT_KERNELS_ENABLE_CUDA``,
            ``CONVIT_KERNELS_TRUST_TRITON``) count at that first resolution;
            ``convit_kernels.clear_backend_cache()`` makes a later change take effect.

    Returns:
        (B, H, N, D) in q's dtype, differentiable in q, k, v, pos_weight, pos_bias and gating.
        Fused backends return it laid out as (B, N, H, D) in memory, so that
        ``out.transpose(1, 2).reshape(B, N, H * D)`` is free; "sdpa" and "reference" return the
        layout their PyTorch ops give.

    Raises:
        TypeError / ValueError naming the argument for malformed input or an unusable backend.

    Export paths: ``torch.compile`` and ``torch.export`` keep the backend's op (fake
    implementations give shapes, also on ``meta`` tensors); ``torch.jit.script`` calls the same
    registered ops (there "auto" means "cpu" on CPU tensors where the extension is built, else
    "sdpa"; ``pos_bias`` gets no gradient); ``torch.onnx.export`` (which sets
    ``torch.onnx.is_in_onnx_export()``) records the composed formulation in standard operators
    for every backend.

    Example::

        >>> import torch, convit_kernels as ck
        >>> q, k, v = (torch.randn(2, 4, 196, 48) for _ in range(3))
        >>> w, b, g = torch.randn(4, 3), torch.zeros(4), torch.ones(4)
        >>> ck.gpsa_attention(q, k, v, w, b, g, grid_size=(14, 14)).shape
        torch.Size([2, 4, 196, 48])
    """
    if torch.jit.is_scripting():  # resolved when scripting: the eager path below is not compiled
        return _gpsa_attention_scripted(q, k, v, pos_weight, pos_bias, gating, grid_size, scale, backend)
    rows, cols, scale = validate_gpsa_inputs(q, k, v, pos_weight, pos_bias, gating, grid_size, scale)
    impl = resolve_backend(backend, q.device, q.dtype)
    if _in_onnx_export():
        # The ONNX exporter has no translation for the backends' ops: record the same function in
        # standard ops (SDPA + the batch-shared positional softmax), which it translates.
        return gpsa_composed(q, k, v, pos_weight, pos_bias, gating, (rows, cols), scale)
    return impl.fn(q, k, v, pos_weight, pos_bias, gating, rows, cols, scale)


def _in_onnx_export() -> bool:
    is_exporting = getattr(torch.onnx, "is_in_onnx_export", None)
    return bool(is_exporting is not None and is_exporting())


# ---- TorchScript --------------------------------------------------------------------------------
# TorchScript cannot run the Python dispatch above. Scripted code calls _gpsa_attention_scripted,
# which checks the arguments and calls the backend's scriptable function. Those live in the
# backends' modules (which may fail to import), so each backend binds its own here on import through
# register_script_impl; TorchScript reads these names when it compiles, after the package imported.

def _not_loaded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos_weight: torch.Tensor,
                pos_bias: torch.Tensor, gating: torch.Tensor, rows: int, cols: int, scale: float) -> torch.Tensor:
    raise ValueError("backend is not available: its module did not load (see convit_kernels.backend_status())")


def _reference_scripted(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos_weight: torch.Tensor,
                        pos_bias: torch.Tensor, gating: torch.Tensor, rows: int, cols: int,
                        scale: float) -> torch.Tensor:
    return gpsa_reference(q, k, v, pos_weight, pos_bias, gating, (rows, cols), scale)


def _auto_without_extension(device_type: str) -> str:
    return "sdpa"


def _auto_with_extension(device_type: str) -> str:
    return "cpu" if device_type == "cpu" else "sdpa"


_script_extension = _not_loaded       # "cpu" and "cuda" (cpp_ops)
_script_sdpa = _not_loaded            # "sdpa" (sdpa_ops)
_script_triton = _not_loaded          # "triton" (triton_ops)
_script_auto = _auto_without_extension  # what "auto" means under TorchScript


def register_script_impl(name: str, fn) -> None:
    """Bind backend ``name``'s scriptable GPSA function (the signature of a ``Backend.fn``, with
    type annotations) for ``torch.jit.script``; called by each backend's module on import."""
    global _script_extension, _script_sdpa, _script_triton, _script_auto
    if name in ("cpu", "cuda"):
        _script_extension = fn
        _script_auto = _auto_with_extension
    elif name == "sdpa":
        _script_sdpa = fn
    elif name == "triton":
        _script_triton = fn
    else:
        raise ValueError(f"name must be one of 'cpu', 'cuda', 'sdpa', 'triton'; got {name!r}")


def _validate_scripted(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos_weight: torch.Tensor,
                       pos_bias: torch.Tensor, gating: torch.Tensor, grid_size: Tuple[int, int],
                       scale: Optional[float]) -> float:
    """The checks of validate_gpsa_inputs that TorchScript can express; returns the scale."""
    if q.dim() != 4:
        raise ValueError(f"q must have shape (B, H, N, D); got a {q.dim()}-d tensor of shape {q.shape}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"k and v must have the shape of q {q.shape}; got {k.shape} and {v.shape}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"k and v must have the dtype of q ({q.dtype}); got {k.dtype} and {v.dtype}")
    H = q.shape[1]
    if pos_weight.shape != [H, 3]:
        raise ValueError(f"pos_weight must have shape (H, 3) = ({H}, 3); got {pos_weight.shape}")
    if pos_bias.shape != [H] or gating.shape != [H]:
        raise ValueError(f"pos_bias and gating must have shape (H,) = ({H},); got {pos_bias.shape} and {gating.shape}")
    rows, cols = grid_size
    if rows < 1 or cols < 1 or rows * cols != q.shape[2]:
        raise ValueError(f"grid_size (rows, cols) must satisfy rows * cols == N = {q.shape[2]}; got ({rows}, {cols})")
    return float(q.shape[3]) ** -0.5 if scale is None else scale


def _gpsa_attention_scripted(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos_weight: torch.Tensor,
                             pos_bias: torch.Tensor, gating: torch.Tensor, grid_size: Tuple[int, int],
                             scale: Optional[float], backend: str) -> torch.Tensor:
    scale_ = _validate_scripted(q, k, v, pos_weight, pos_bias, gating, grid_size, scale)
    rows, cols = grid_size
    dev = q.device.type
    if backend == "auto":
        backend = _script_auto(dev)
    if backend == "cpu" or backend == "cuda":
        if dev != backend and dev != "meta":
            raise ValueError(f"backend={backend} runs on {backend} tensors; got {dev} tensors")
        return _script_extension(q, k, v, pos_weight, pos_bias, gating, rows, cols, scale_)
    if backend == "sdpa":
        return _script_sdpa(q, k, v, pos_weight, pos_bias, gating, rows, cols, scale_)
    if backend == "triton":
        return _script_triton(q, k, v, pos_weight, pos_bias, gating, rows, cols, scale_)
    if backend == "reference":
        return _reference_scripted(q, k, v, pos_weight, pos_bias, gating, rows, cols, scale_)
    raise ValueError(f"backend must be 'auto', 'reference', 'cpu', 'cuda', 'triton' or 'sdpa'; got {backend}")
