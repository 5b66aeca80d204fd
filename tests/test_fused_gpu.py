"""The fused GPU backends ("cuda": csrc/cuda/, "triton": convit_kernels/triton_*.py) on a CUDA GPU.

One test body per property, parametrized over the fused backends (ids ``fused_cuda`` and
``fused_triton``, so ``-k fused_cuda`` selects one): precision against the float64 reference by
the project's rule (bf16/fp16/fp32, odd N, non-square grids, both sides of the whole-row limit),
B * H = 4096, bitwise determinism, races at a large batch, opcheck, torch.compile(fullgraph=True)
and the ConViT model. What only one backend has stays in tests/test_cuda_gpu.py (float64 ops, odd
head dims, alignment, compute-sanitizer, the opt-in) and tests/test_triton_gpu.py (forced tiles,
split head dims, autotuning, dynamic shapes).

Every test is marked ``gpu`` (skipped by tests/conftest.py where CUDA is absent). The CUDA
backend is opt-in until a GPU run has verified it: the fixture sets CONVIT_KERNELS_ENABLE_CUDA=1.
"""
import pytest
import torch

import convit_kernels as ck
from convit_kernels.testing import (
    GRAD_NAMES, assert_close, check_against_reference, make_gpsa_inputs, max_error, no_tf32, output_and_grads,
)

# Odd N (50, 197, 257, 577), non-square grids, both sides of the whole-row limit (256).
GRIDS = {50: (5, 10), 196: (14, 14), 197: (1, 197), 256: (16, 16), 257: (1, 257), 300: (15, 20),
         577: (1, 577), 576: (24, 24)}
SHAPES = [(50, 48), (197, 16), (197, 32), (197, 48), (197, 64), (197, 128), (196, 48), (256, 64), (257, 48),
          (577, 48), (577, 128), (300, 64)]
# The raw forward / backward ops of each backend and the extra arguments after scale (Triton: block_n).
OPS = {"cuda": ("gpsa_fwd", "gpsa_bwd", ()), "triton": ("gpsa_fwd_triton", "gpsa_bwd_triton", (0,))}


@pytest.fixture(params=[pytest.param("cuda", id="fused_cuda"), pytest.param("triton", id="fused_triton")])
def backend(request, monkeypatch):
    """A fused backend, opted in; fails (not skips) with the reason if it cannot run on this GPU."""
    name = request.param
    if name == "cuda":
        monkeypatch.setenv("CONVIT_KERNELS_ENABLE_CUDA", "1")
    ck.clear_backend_cache()  # the opt-in is read when a backend is first resolved
    status = ck.backend_status("cuda")[name]
    if status != "available":
        pytest.fail(f"backend {name!r} is not available on this GPU machine: {status}")
    yield name
    ck.clear_backend_cache()


def _fn(backend):
    return lambda q, k, v, w, b, g, grid: ck.gpsa_attention(q, k, v, w, b, g, grid, backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("N,D", SHAPES)
def test_forward_and_gradients_match_reference(backend, dtype, N, D):
    check_against_reference(_fn(backend), 2, 3, N, D, dtype, GRIDS[N])


@pytest.mark.gpu
@pytest.mark.parametrize("N", [50, 577])
def test_contiguous_bhnd_inputs(backend, N):
    check_against_reference(_fn(backend), 2, 3, N, 32, torch.float32, GRIDS[N], layout="bhnd")


@pytest.mark.gpu
def test_many_batch_heads(backend):
    """B * H = 4096 (ConViT-B at B = 256): grid limits and indexing, bf16 by the 2x rule."""
    check_against_reference(_fn(backend), 256, 16, 196, 48, torch.bfloat16, GRIDS[196])


@pytest.mark.gpu
def test_backward_deterministic_over_50_repeats(backend):
    inputs = make_gpsa_inputs(32, 9, 196, 48, (14, 14), dtype=torch.bfloat16, device="cuda", layout="bnhd")
    grad_out = torch.randn(32, 9, 196, 48, device="cuda")
    first = output_and_grads(_fn(backend), inputs, grad_out)
    for _ in range(50):
        again = output_and_grads(_fn(backend), inputs, grad_out)
        for name, a, b in zip(GRAD_NAMES, first, again):
            assert torch.equal(a, b), f"{name} differs between identical runs"


@pytest.mark.gpu
@pytest.mark.parametrize("N", [196, 577])
def test_no_races_at_large_batch(backend, N):
    """Large grid, many repeats: every run bitwise equal and close to the composed baseline."""
    B, H, D = (512, 4, 48) if N == 196 else (64, 4, 64)
    inputs = make_gpsa_inputs(B, H, N, D, GRIDS[N], dtype=torch.float16, device="cuda", layout="bnhd")
    grad_out = torch.randn(B, H, N, D, device="cuda")
    first = output_and_grads(_fn(backend), inputs, grad_out)
    with no_tf32():
        *ts, grid = inputs
        expected = ck.gpsa_composed(*(t.float() for t in ts), grid)
    # fp16 storage of the output: 2^-11 relative to |out| <= a few.
    assert_close(first[0], expected, atol=1e-2, name="out vs composed fp32")
    for _ in range(20):
        again = output_and_grads(_fn(backend), inputs, grad_out)
        for name, a, b in zip(GRAD_NAMES, first, again):
            assert torch.equal(a, b), f"{name} differs between identical runs"


@pytest.mark.gpu
def test_opcheck(backend):
    fwd_name, bwd_name, extra = OPS[backend]
    fwd, bwd = getattr(torch.ops.convit_kernels, fwd_name), getattr(torch.ops.convit_kernels, bwd_name)
    for N, grid, dtype in ((50, (5, 10), torch.float32), (300, (15, 20), torch.bfloat16)):
        q, k, v, w, b, g, (rows, cols) = make_gpsa_inputs(2, 3, N, 48, grid, dtype=dtype, device="cuda",
                                                          layout="bnhd", requires_grad=True)
        scale = 48 ** -0.5
        torch.library.opcheck(fwd.default, (q, k, v, w, g, rows, cols, scale, *extra))
        out, lse = fwd(q, k, v, w, g, rows, cols, scale, *extra)
        grad_out = torch.randn_like(out)
        bwd_args = tuple(t.detach() for t in (grad_out, q, k, v, w, g, lse)) + (rows, cols, scale, *extra)
        torch.library.opcheck(bwd.default, bwd_args)


@pytest.mark.gpu
def test_compile_fullgraph_convit_tiny_matches_eager(backend):
    import convit

    torch.manual_seed(0)
    model = convit.create_model("convit_tiny", gpsa_backend=backend).cuda()
    for m in model.modules():
        if hasattr(m, "gating_param"):
            with torch.no_grad():
                m.gating_param.normal_()
    x = torch.randn(4, 3, 224, 224, device="cuda")
    with no_tf32():
        model.eval()
        eager = model(x)
        got = torch.compile(model, fullgraph=True)(x)
        # fp32 throughout; inductor reorders the surrounding reductions (LayerNorm, GELU):
        # differences stay at the 1e-5 level of fp32 over 12 blocks.
        assert_close(got, eager, atol=1e-3 * max(1.0, eager.abs().max().item()), name="compiled logits")
        model.train()
        loss = torch.compile(model, fullgraph=True)(x).square().mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        model(x).square().mean().backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                assert_close(grads[n], p.grad, atol=1e-3 * max(1.0, p.grad.abs().max().item()), name=f"grad {n}")


@pytest.mark.gpu
def test_convit_small_logits_match_reference(backend):
    import convit

    torch.manual_seed(0)
    model = convit.create_model("convit_small", gpsa_backend="reference").cuda().eval()
    x = torch.randn(8, 3, 224, 224, device="cuda")
    with no_tf32(), torch.no_grad():
        expected = model(x)
        convit.swap_gpsa(model, backend=backend)
        got = model(x)
        assert_close(got, expected, atol=1e-4 * max(1.0, expected.abs().max().item()), name="convit_small fp32")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got_bf16 = model(x).float()
            convit.swap_gpsa(model, backend="reference")
            ref_bf16 = model(x).float()
        # Both in bf16 autocast: the fused kernel must not be worse than the reference is.
        assert max_error(got_bf16, expected) <= 2.0 * max_error(ref_bf16, expected) + 1e-3
