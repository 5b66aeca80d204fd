"""The backend registry behind ``gpsa_attention``.

Every backend registers one entry here: a name, the device types it serves, a probe that says
whether it can run (and why not), its rank for ``backend="auto"``, and the function that computes
GPSA. Backends live in their own modules (``reference``, ``cpu_ops``, ``triton_ops``, ...) and
register themselves on import, so adding one never touches a caller.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Tuple

import torch

__all__ = ["Backend", "register_backend", "available_backends", "backend_status", "resolve_backend"]

# fn(q, k, v, pos_weight, pos_bias, gating, rows, cols, scale) -> out
GPSAFunction = Callable[..., torch.Tensor]


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    fn: GPSAFunction
    device_types: Tuple[str, ...]
    # Returns (available, reason); reason explains a False and may be empty for True.
    probe: Callable[[str], Tuple[bool, str]]
    # Higher wins for "auto"; None means "auto" never picks it (opt-in by name only).
    auto_rank: Optional[Callable[[str], Optional[int]]] = None
    dtypes: Tuple[torch.dtype, ...] = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


_REGISTRY: dict[str, Backend] = {}
KNOWN_BACKENDS = ("reference", "cpu", "cuda", "triton")


def register_backend(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend


def _device_type(device) -> str:
    if device is None:
        return "cpu"
    if isinstance(device, torch.device):
        return device.type
    return torch.device(device).type


def backend_status(device="cpu") -> dict[str, str]:
    """For every known backend: ``"available"`` or the reason it cannot run on ``device``."""
    dev = _device_type(device)
    status = {}
    for name in KNOWN_BACKENDS:
        backend = _REGISTRY.get(name)
        if backend is None:
            status[name] = _MISSING_REASONS.get(name, "not registered")
            continue
        if dev not in backend.device_types:
            status[name] = f"does not run on {dev!r} tensors (runs on {', '.join(backend.device_types)})"
            continue
        ok, reason = backend.probe(dev)
        status[name] = "available" if ok else reason
    return status


def available_backends(device="cpu") -> list[str]:
    """Names of the backends that can run on ``device`` ("cpu", "cuda", a torch.device, ...).

    Always contains ``"reference"``.
    """
    return [name for name, s in backend_status(device).items() if s == "available"]


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend that ``name`` means for tensors on ``device``; raises ValueError if it cannot run."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, one of {('auto',) + KNOWN_BACKENDS}; got {type(name).__name__}")
    dev = device.type
    if name == "auto":
        best, best_rank = _REGISTRY["reference"], -1
        for backend in _REGISTRY.values():
            rank = backend.auto_rank(dev) if backend.auto_rank is not None else None
            if rank is None or rank <= best_rank or dev not in backend.device_types:
                continue
            if dtype not in backend.dtypes or not backend.probe(dev)[0]:
                continue
            best, best_rank = backend, rank
        return best
    if name not in KNOWN_BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {list(KNOWN_BACKENDS)}; got {name!r}")
    status = backend_status(dev)[name]
    if status != "available":
        raise ValueError(f"backend={name!r} is not available for {dev} tensors: {status}")
    backend = _REGISTRY[name]
    if dtype not in backend.dtypes:
        raise ValueError(
            f"backend={name!r} does not support dtype {dtype}; it supports {[str(d) for d in backend.dtypes]}"
        )
    return backend


# Why a backend module failed to register (set by the package __init__ when an import fails).
_MISSING_REASONS: dict[str, str] = {}
