"""Fused gated positional self-attention (GPSA) for ConViT.

    >>> import convit_kernels as ck
    >>> out = ck.gpsa_attention(q, k, v, pos_weight, pos_bias, gating, grid_size=(14, 14))
    >>> ck.available_backends("cuda"), ck.backend_status("cpu"), ck.backend_report("cuda")

``import convit_kernels`` never raises because an optional backend (the C++ extension, Triton)
is missing or broken: that backend is left out of ``available_backends()`` and
``backend_status()`` says why.
"""
from __future__ import annotations

import importlib

from .api import gpsa_attention, validate_gpsa_inputs
from .backends import (Backend, available_backends, backend_report, backend_status, clear_backend_cache,
                       register_backend, _MISSING_REASONS)
from .reference import gpsa_composed, gpsa_reference, relative_indices

__all__ = [
    "gpsa_attention",
    "available_backends",
    "backend_status",
    "backend_report",
    "clear_backend_cache",
    "gpsa_reference",
    "gpsa_composed",
    "relative_indices",
    "validate_gpsa_inputs",
]
__version__ = "0.1.0"


def _reference_fn(q, k, v, pos_weight, pos_bias, gating, rows, cols, scale):
    return gpsa_reference(q, k, v, pos_weight, pos_bias, gating, (rows, cols), scale)


register_backend(
    Backend(
        name="reference",
        fn=_reference_fn,
        device_types=("cpu", "cuda", "mps", "xpu", "meta"),
        probe=lambda dev: (True, ""),
        auto_rank=lambda dev: 0,
    )
)

# Optional backends register themselves on import; a failure is recorded, never raised.
for _names, _module in ((("cpu", "cuda"), "cpp_ops"), (("triton",), "triton_ops"), (("sdpa",), "sdpa_ops")):
    try:
        importlib.import_module(f"{__name__}.{_module}")
    except Exception as _err:  # noqa: BLE001 - any failure here must leave the package importable
        for _name in _names:
            _MISSING_REASONS[_name] = f"convit_kernels.{_module} failed to import: {type(_err).__name__}: {_err}"
del _names, _module
