"""Shared pieces of the benchmark suite: where and how it measures.

One suite serves the CPU and a GPU: the device is CUDA when one is visible (override with
``CONVIT_BENCH_DEVICE=cpu|cuda``), and the shapes, dtype, rounds and the cache flush follow it.

Environment knobs (all optional):
  CONVIT_BENCH_DEVICE    cpu | cuda             (default: cuda if visible, else cpu)
  CONVIT_BENCH_ROUNDS    timed rounds per case  (default: 30 op / 10 model on GPU, 10 op / 3 model on CPU)
  CONVIT_BENCH_COMPILE   all | subset | none    which torch.compile model variants run (default subset)
"""
from __future__ import annotations

import os
import statistics

import torch

import convit_kernels as ck
from convit_kernels.backends import KNOWN_BACKENDS, resolve_backend

__all__ = ["DEVICE", "ON_GPU", "DTYPE", "CacheFlusher", "sync", "peak_memory", "event_median_ms",
           "backend_or_skip_reason", "rounds", "MEMORY_METHOD"]

DEVICE = os.environ.get("CONVIT_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE not in ("cpu", "cuda"):
    raise ValueError(f"CONVIT_BENCH_DEVICE must be 'cpu' or 'cuda'; got {DEVICE!r}")
ON_GPU = DEVICE == "cuda"
# bf16 on GPU (what training uses), fp32 on CPU (bf16 matmuls on a CPU measure the wrong thing).
DTYPE = torch.bfloat16 if ON_GPU else torch.float32

MEMORY_METHOD = (
    "torch.cuda.max_memory_allocated during one call, minus the bytes allocated before it"
    if ON_GPU else
    "torch.profiler(profile_memory=True): peak of the running sum of CPU allocator events during one "
    "call, relative to its start"
)


def rounds(default_gpu: int, default_cpu: int) -> int:
    value = os.environ.get("CONVIT_BENCH_ROUNDS")
    if value:
        return max(1, int(value))
    return default_gpu if ON_GPU else default_cpu


def sync():
    if ON_GPU:
        torch.cuda.synchronize()


class CacheFlusher:
    """Overwrites a buffer larger than the last-level cache, so no round starts with warm inputs.

    GPU: 256 MB (an H100 has 50 MB of L2). CPU: 64 MB, twice the 32 MB L3 of this machine's EPYC;
    the write costs ~10 ms per round on 2 cores, outside the timed region.
    """

    def __init__(self):
        nbytes = (256 if ON_GPU else 64) * 2**20
        self.buffer = torch.empty(nbytes // 4, dtype=torch.int32, device=DEVICE)
        self._value = 0

    def flush(self):
        self._value += 1
        self.buffer.fill_(self._value)
        sync()


def backend_or_skip_reason(name: str, dtype: torch.dtype) -> str | None:
    """None if GPSA backend ``name`` can be timed on this device and dtype, else why not."""
    if name not in KNOWN_BACKENDS:
        raise ValueError(f"unknown backend {name!r}; known: {KNOWN_BACKENDS}")
    status = ck.backend_status(DEVICE)[name]
    if name == "triton" and not ON_GPU:
        return ("triton is excluded from CPU timings: on CPU it runs under the Triton interpreter "
                f"(TRITON_INTERPRET=1), which is not a meaningful timing (backend status: {status})")
    if status != "available":
        return f"backend {name!r} unavailable on {DEVICE}: {status}"
    try:
        resolve_backend(name, torch.device(DEVICE), dtype)
    except ValueError as err:
        return str(err)
    return None


def _cpu_peak_bytes(run) -> int | None:
    """Peak of the running sum of allocations minus frees that the CPU allocator reports during ``run``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    try:
        events = prof.profiler.kineto_results.events()
    except AttributeError:  # a torch whose profiler keeps its raw results elsewhere
        return None
    records = sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns())
    current = peak = 0
    for e in records:
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def peak_memory(run) -> int | None:
    """Peak bytes allocated by one call of ``run`` beyond what was allocated when it started."""
    if ON_GPU:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return _cpu_peak_bytes(run)


def event_median_ms(setup, target, n: int) -> float | None:
    """GPU only: median of ``n`` CUDA-event timings of ``target(*setup())`` (setup untimed; it flushes)."""
    if not ON_GPU:
        return None
    times = []
    for _ in range(n):
        args = setup() or ((), {})
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        target(*args[0], **args[1])
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
