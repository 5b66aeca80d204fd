"""The backend registry behind ``gpsa_attention``.

Every backend registers one entry here: a name, the device types it serves, a probe that says
whether it can run (and why not), its rank for ``backend="auto"``, and the function that computes
GPSA. Backends live in their own modules (``reference``, ``cpp_ops``, ``triton_ops``,
``sdpa_ops``) and register themselves on import, so adding one never touches a caller.

Resolution is cached: ``resolve_backend`` decides once per (name, device type, dtype) and
``gpsa_attention`` then costs a dictionary lookup. A named backend probes only itself; ``"auto"``
probes the candidates for that device. The probes read environment variables
(``CONVIT_KERNELS_ENABLE_CUDA``, ``CONVIT_KERNELS_TRUST_TRITON``) on the first resolution only:
call ``clear_backend_cache()`` after changing them in a running process.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Tuple

import torch

__all__ = ["Backend", "register_backend", "available_backends", "backend_status", "backend_report",
           "resolve_backend", "clear_backend_cache", "KNOWN_BACKENDS"]

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
KNOWN_BACKENDS = ("reference", "cpu", "cuda", "triton", "sdpa")
# (name, device type, dtype) -> Backend, filled by resolve_backend.
_RESOLVED: dict[tuple, Backend] = {}


def register_backend(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend
    _RESOLVED.clear()


def clear_backend_cache() -> None:
    """Forget every resolved backend, so the next call probes again (e.g. after changing
    ``CONVIT_KERNELS_ENABLE_CUDA`` or ``CONVIT_KERNELS_TRUST_TRITON`` in a running process)."""
    _RESOLVED.clear()


def _device_type(device) -> str:
    """The device type of ``device`` (None means "cpu"); ValueError/TypeError naming ``device``."""
    if device is None:
        return "cpu"
    if isinstance(device, torch.device):
        return device.type
    if not isinstance(device, str):
        raise TypeError(f"device must be a torch.device or a str such as 'cpu', 'cuda', 'cuda:0' or 'mps'; "
                        f"got {type(device).__name__}")
    try:
        return torch.device(device).type
    except RuntimeError as err:
        raise ValueError(f"device must be a torch.device or a str such as 'cpu', 'cuda', 'cuda:0' or 'mps'; "
                         f"got {device!r} ({err})") from None


def _status(name: str, dev: str) -> str:
    """``"available"`` or why backend ``name`` cannot run on ``dev`` tensors; probes only that backend."""
    backend = _REGISTRY.get(name)
    if backend is None:
        return _MISSING_REASONS.get(name, "not registered")
    if dev == "meta":
        # Shapes and dtypes only: every registered backend's ops have fake implementations, which
        # serve meta tensors (shape inference, deferred init) without the kernel or its device.
        return "available"
    if dev not in backend.device_types:
        return f"does not run on {dev!r} tensors (runs on {', '.join(backend.device_types)})"
    ok, reason = backend.probe(dev)
    return "available" if ok else reason


def backend_status(device="cpu") -> dict[str, str]:
    """For every known backend: ``"available"`` or the reason it cannot run on ``device``.

    ``device``: a torch.device or a device string ("cpu", "cuda", "cuda:0", "mps", ...). Unlike
    ``resolve_backend`` this probes every backend on every call (it is for people, not hot paths).
    """
    dev = _device_type(device)
    return {name: _status(name, dev) for name in KNOWN_BACKENDS}


def available_backends(device="cpu") -> list[str]:
    """Names of the backends that can run on ``device`` ("cpu", "cuda", a torch.device, ...).

    Always contains ``"reference"``.
    """
    return [name for name, s in backend_status(device).items() if s == "available"]


def _auto_rank(backend: Backend, dev: str) -> Optional[int]:
    return backend.auto_rank(dev) if backend.auto_rank is not None else None


def _auto_choice(dev: str, dtype: torch.dtype) -> Backend:
    best, best_rank = _REGISTRY["reference"], -1
    for backend in _REGISTRY.values():
        rank = _auto_rank(backend, dev)
        if rank is None or rank <= best_rank or dev not in backend.device_types:
            continue
        if dtype not in backend.dtypes or not backend.probe(dev)[0]:
            continue
        best, best_rank = backend, rank
    return best


def backend_report(device="cpu", dtype=torch.float32) -> dict[str, str]:
    """For every known backend, one sentence: whether ``backend="auto"`` picks it for ``dtype``
    tensors on ``device``, and why or why not (unavailable and the reason, lower rank than the
    winner, or never picked by ``auto`` because it is opt-in by name).

    Probes every backend afresh (it does not read or fill the resolution cache).
    """
    dev = _device_type(device)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype; got {type(dtype).__name__}")
    chosen = _auto_choice(dev, dtype)
    chosen_rank = _auto_rank(chosen, dev)
    report = {}
    for name in KNOWN_BACKENDS:
        status = _status(name, dev)
        backend = _REGISTRY.get(name)
        if status != "available":
            report[name] = f"unavailable: {status}"
        elif dtype not in backend.dtypes:
            report[name] = f"available, but not for {dtype} (supports {', '.join(str(d) for d in backend.dtypes)})"
        elif backend is chosen:
            report[name] = f"chosen by auto for {dev} {dtype} tensors (rank {chosen_rank}, the highest available)"
        elif _auto_rank(backend, dev) is None:
            report[name] = (f"available by name; auto never picks it on {dev} tensors (opt-in: not yet verified "
                            "or not faster there)")
        else:
            report[name] = (f"available; auto prefers {chosen.name!r} (rank {chosen_rank} > "
                            f"{_auto_rank(backend, dev)})")
    if dev == "cpu" and _status("cpu", dev) == "available":
        report["cpu"] += f"; {cpu_isa_note()}"
    return report


def cpu_isa_note() -> str:
    """The ISA level the C++ CPU kernels run at and the levels this CPU supports, in one phrase."""
    ops = torch.ops.convit_kernels
    levels = ", ".join(ops.cpu_isa_levels())
    return (f"ISA level {ops.cpu_isa()} (this CPU supports {levels}; CONVIT_KERNELS_CPU_ISA forces a lower one, "
            "csrc/cpu/gpsa_cpu.h)")


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend that ``name`` means for tensors on ``device``; raises ValueError if it cannot run.

    Cached per (name, device type, dtype): the probes (and the environment variables they read) run
    on the first resolution only; ``clear_backend_cache()`` forgets the choices.
    """
    dev = device.type if isinstance(device, torch.device) else _device_type(device)
    key = (name, dev, dtype)
    try:
        return _RESOLVED[key]
    except (KeyError, TypeError):  # TypeError: an unhashable name, reported below
        pass
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, one of {('auto',) + KNOWN_BACKENDS}; got {type(name).__name__}")
    if name == "auto":
        backend = _auto_choice(dev, dtype)
    else:
        if name not in KNOWN_BACKENDS:
            raise ValueError(f"backend must be 'auto' or one of {list(KNOWN_BACKENDS)}; got {name!r}")
        status = _status(name, dev)
        if status != "available":
            raise ValueError(f"backend={name!r} is not available for {dev} tensors: {status}")
        backend = _REGISTRY[name]
        if dtype not in backend.dtypes:
            raise ValueError(
                f"backend={name!r} does not support dtype {dtype}; it supports {[str(d) for d in backend.dtypes]}"
            )
    _RESOLVED[key] = backend
    return backend


# Why a backend module failed to register (set by the package __init__ when an import fails).
_MISSING_REASONS: dict[str, str] = {}
