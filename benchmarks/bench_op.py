"""One GPSA op: forward, backward, forward + backward, every provider on the same inputs.

Shapes: the GPSA layers of ConViT-Ti, S and B (N = 196 tokens of a 14 x 14 grid, head dim 48,
H = 4, 9, 16), batch 8 on CPU (fp32) and 64 and 256 on GPU (bf16). Inputs come from
``make_gpsa_inputs`` in the strided "bnhd" layout that the model's projections give.

Providers:
  reference, cpu, cuda, triton,  ``gpsa_attention(..., backend=name)``; "reference" is the official
  sdpa                           eager formulation, "sdpa" the portable backend (SDPA + the
                                 batch-shared positional op with its batch-contracted backward).
                                 Unavailable ones are skipped with the reason.
  reference_compile              ``torch.compile(gpsa_reference)`` (the official formulation compiled)
  composed                       ``gpsa_composed``: SDPA + one batch-shared positional matmul, with
                                 plain autograd (its backward forms a (B, H, N, N) tensor): the
                                 composed-PyTorch baseline the fused kernels must beat
  plain_sdpa                     plain ``F.scaled_dot_product_attention(q, k, v)``: the floor
                                 (named "sdpa" in result files recorded before the sdpa backend)

Modes: "fwd" is the forward of a training step (inputs require grad, so each provider saves what
its backward needs); "bwd" times only the backward of a forward done in the untimed setup;
"fwd_bwd" both. Before every round the last-level cache is overwritten (see CacheFlusher).
"""
import pytest
import torch
import torch.nn.functional as F

import convit_kernels as ck
from convit_kernels.backends import KNOWN_BACKENDS
from convit_kernels.reference import gpsa_composed, gpsa_reference
from convit_kernels.testing import make_gpsa_inputs

from convit_bench import (DEVICE, DTYPE, MEMORY_METHOD, ON_GPU, CacheFlusher, backend_or_skip_reason,
                          event_median_ms, peak_memory, rounds, sync)

N, D, GRID = 196, 48, (14, 14)
HEADS = {"convit_tiny": 4, "convit_small": 9, "convit_base": 16}
BATCHES = (64, 256) if ON_GPU else (8,)
MODES = ("fwd", "bwd", "fwd_bwd")
PROVIDERS = KNOWN_BACKENDS + ("reference_compile", "composed", "plain_sdpa")
# CPU: 20 rounds, as the reference varies much from round to round (page faults of its fresh N x N tensors).
ROUNDS = rounds(30, 20)
WARMUP = 3 if ON_GPU else 1

_compiled_reference = None


def _plain_sdpa(q, k, v, pos_weight, pos_bias, gating, grid_size):
    return F.scaled_dot_product_attention(q, k, v)  # default scale D ** -0.5, as GPSA's


def _provider(name):
    """``fn(q, k, v, pos_weight, pos_bias, gating, grid_size) -> out`` for provider ``name``."""
    global _compiled_reference
    if name in KNOWN_BACKENDS:
        reason = backend_or_skip_reason(name, DTYPE)
        if reason:
            pytest.skip(reason)
        return lambda q, k, v, w, b, g, grid: ck.gpsa_attention(q, k, v, w, b, g, grid, backend=name)
    if name == "reference_compile":
        if _compiled_reference is None:
            # One compiled function for all shapes; dynamic=False so each shape gets its own
            # specialised kernels (what a user who compiles a fixed-shape model gets).
            _compiled_reference = torch.compile(gpsa_reference, dynamic=False)
        return _compiled_reference
    if name == "composed":
        return gpsa_composed
    if name == "plain_sdpa":
        return _plain_sdpa
    raise ValueError(f"unknown provider {name!r}")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("model", list(HEADS))
def test_gpsa_op(benchmark, model, batch, mode, provider):
    fn = _provider(provider)
    heads = HEADS[model]
    inputs = make_gpsa_inputs(batch, heads, N, D, grid_size=GRID, dtype=DTYPE, device=DEVICE,
                              requires_grad=True, layout="bnhd")
    leaves = inputs[:-1]
    grad_out = torch.randn(batch, heads, N, D, device=DEVICE, dtype=DTYPE)
    flusher = CacheFlusher()

    def clear_grads():
        for t in leaves:
            t.grad = None

    def forward():
        out = fn(*inputs)
        sync()
        return out

    def forward_backward():
        out = fn(*inputs)
        out.backward(grad_out)
        sync()

    def backward(out):
        out.backward(grad_out)
        sync()

    def setup_fwd():
        clear_grads()
        flusher.flush()

    def setup_bwd():
        clear_grads()
        out = fn(*inputs)
        flusher.flush()  # also waits for the forward
        return (out,), {}

    target, setup = {"fwd": (forward, setup_fwd), "bwd": (backward, setup_bwd),
                     "fwd_bwd": (forward_backward, setup_fwd)}[mode]

    benchmark.group = f"op {model} (H={heads}) B={batch} {str(DTYPE).removeprefix('torch.')} {mode}"
    benchmark.extra_info.update(kind="op", model=model, heads=heads, batch=batch, tokens=N, head_dim=D,
                                dtype=str(DTYPE).removeprefix("torch."), device=DEVICE, mode=mode,
                                provider=provider, memory_method=MEMORY_METHOD)
    if not benchmark.disabled:
        # Untimed: the first call compiles (torch.compile, Triton autotuning) and fills caches; the
        # second measures peak memory (under the profiler on CPU) and doubles as a warm-up round.
        args, kwargs = setup() or ((), {})
        target(*args, **kwargs)
        args, kwargs = setup() or ((), {})
        benchmark.extra_info["peak_bytes"] = peak_memory(lambda: target(*args, **kwargs))
        del args, kwargs
    benchmark.pedantic(target, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP)
    if benchmark.disabled:
        return
    median_ms = event_median_ms(setup, target, ROUNDS)
    if median_ms is not None:
        benchmark.extra_info["cuda_event_median_ms"] = median_ms
