"""The Triton GPSA kernels on a CUDA GPU: precision, sizes, determinism, races, opcheck, compile.

Every test is marked ``gpu`` (skipped by tests/conftest.py where CUDA is absent). The CPU
interpreter tests in tests/test_triton.py cover the same math at tiny sizes; these add bf16,
realistic N and D, B * H up to 4096, bitwise determinism, and what the interpreter cannot run
(``torch.library.opcheck`` and ``torch.compile`` of the triton_ops).
"""
import contextlib

import pytest
import torch

import convit_kernels as ck
from convit_kernels.testing import (
    assert_close, assert_within_reference_rule, make_gpsa_inputs, max_error, reference_errors,
)

NAMES = ("out", "grad_q", "grad_k", "grad_v", "grad_pos_weight", "grad_pos_bias", "grad_gating")
GRIDS = {50: (5, 10), 196: (14, 14), 197: (1, 197), 577: (1, 577), 576: (24, 24)}


@contextlib.contextmanager
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _triton_ops():
    from convit_kernels import triton_ops
    return triton_ops


def _run(inputs, grad_out, block_n=0, split_d=False):
    *tensors, grid = inputs
    ts = [t.detach().requires_grad_(True) for t in tensors]
    out = _triton_ops().gpsa_triton(*ts, grid, block_n=block_n, split_d=split_d)
    grads = torch.autograd.grad(out, ts, grad_out.to(out.dtype))
    return out, grads


def _check_against_reference(B, H, N, D, dtype, layout="bnhd", block_n=0, split_d=False):
    inputs = make_gpsa_inputs(B, H, N, D, GRIDS[N], dtype=dtype, device="cuda", layout=layout)
    # Representable in dtype, so its rounding is not counted as the kernel's error.
    grad_out = torch.randn(B, H, N, D, device="cuda").to(dtype).float()
    with _no_tf32():
        out64, grads64, ref_err_out, ref_err_grads = reference_errors(inputs, dtype, grad_out)
        out, grads = _run(inputs, grad_out, block_n, split_d)
    assert grads[4].abs().max().item() == 0.0
    for i, (name, got, want) in enumerate(zip(NAMES, (out, *grads), (out64, *grads64))):
        if name == "grad_pos_bias":
            continue
        ref_err = ref_err_out if i == 0 else ref_err_grads[i - 1]
        assert_within_reference_rule(name, got, want, ref_err, dtype, gradient=i > 0, context=f", N={N}, D={D}")


SHAPES = [(50, 48), (197, 16), (197, 32), (197, 48), (197, 64), (197, 128), (577, 48), (577, 128), (196, 48)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("N,D", SHAPES)
def test_forward_and_gradients_match_reference(dtype, N, D):
    _check_against_reference(2, 3, N, D, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_tiled_path_forced_at_small_n(dtype):
    _check_against_reference(2, 3, 196, 48, dtype, block_n=32)
    _check_against_reference(2, 3, 50, 64, dtype, layout="bhnd", block_n=16)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("N,D", [(196, 48), (197, 80), (577, 48)])
def test_split_head_dim(dtype, N, D):
    """48 = 32 + 16 and 80 = 64 + 16 chunks (split_d=True), whole-row and tiled."""
    _check_against_reference(2, 3, N, D, dtype, split_d=True)


@pytest.mark.gpu
def test_many_batch_heads():
    """B * H = 4096 (ConViT-B at B = 256): grid limits and indexing, bf16 by the 2x rule."""
    _check_against_reference(256, 16, 196, 48, torch.bfloat16)


def _fwd_bwd_once(inputs, grad_out):
    out, grads = _run(inputs, grad_out)
    return [out] + list(grads)


@pytest.mark.gpu
def test_backward_deterministic_over_50_repeats():
    inputs = make_gpsa_inputs(32, 9, 196, 48, (14, 14), dtype=torch.bfloat16, device="cuda", layout="bnhd")
    grad_out = torch.randn(32, 9, 196, 48, device="cuda")
    first = _fwd_bwd_once(inputs, grad_out)
    for _ in range(50):
        again = _fwd_bwd_once(inputs, grad_out)
        for name, a, b in zip(NAMES, first, again):
            assert torch.equal(a, b), f"{name} differs between identical runs"


@pytest.mark.gpu
def test_no_races_at_large_batch():
    """Large grid, many repeats: every run bitwise equal and close to the composed baseline."""
    B, H, N, D = 512, 4, 196, 48
    inputs = make_gpsa_inputs(B, H, N, D, (14, 14), dtype=torch.float16, device="cuda", layout="bnhd")
    grad_out = torch.randn(B, H, N, D, device="cuda")
    first = _fwd_bwd_once(inputs, grad_out)
    with _no_tf32():
        *ts, grid = inputs
        expected = ck.gpsa_composed(*(t.float() for t in ts), grid)
    # fp16 storage of the output: 2^-11 relative to |out| <= a few.
    assert_close(first[0], expected, atol=1e-2, name="out vs composed fp32")
    for _ in range(20):
        again = _fwd_bwd_once(inputs, grad_out)
        for name, a, b in zip(NAMES, first, again):
            assert torch.equal(a, b), f"{name} differs between identical runs"


@pytest.mark.gpu
def test_opcheck():
    q, k, v, w, b, g, (rows, cols) = make_gpsa_inputs(2, 3, 50, 48, (5, 10), device="cuda", layout="bnhd",
                                                      requires_grad=True)
    scale = 48 ** -0.5
    torch.library.opcheck(torch.ops.convit_kernels.gpsa_fwd_triton.default,
                          (q, k, v, w, g, rows, cols, scale, 0))
    torch.library.opcheck(torch.ops.convit_kernels.gpsa_fwd_triton.default,
                          (q, k, v, w, g, rows, cols, scale, 16))
    out, lse = torch.ops.convit_kernels.gpsa_fwd_triton(q, k, v, w, g, rows, cols, scale, 0)
    grad_out = torch.randn_like(out)
    bwd_args = tuple(t.detach() for t in (grad_out, q, k, v, w, g, lse)) + (rows, cols, scale, 0)
    torch.library.opcheck(torch.ops.convit_kernels.gpsa_bwd_triton.default, bwd_args)


@pytest.mark.gpu
def test_compile_fullgraph_convit_tiny_matches_eager():
    import convit

    torch.manual_seed(0)
    model = convit.create_model("convit_tiny", gpsa_backend="triton").cuda()
    for m in model.modules():
        if hasattr(m, "gating_param"):
            with torch.no_grad():
                m.gating_param.normal_()
    x = torch.randn(4, 3, 224, 224, device="cuda")
    with _no_tf32():
        model.eval()
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)
        got = compiled(x)
        # fp32 throughout; inductor reorders the surrounding reductions (LayerNorm, GELU):
        # differences stay at the 1e-5 level of fp32 over 12 blocks.
        assert_close(got, eager, atol=1e-3 * max(1.0, eager.abs().max().item()), name="compiled logits")
        model.train()
        compiled_train = torch.compile(model, fullgraph=True)
        loss = compiled_train(x).square().mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        model(x).square().mean().backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                assert_close(grads[n], p.grad, atol=1e-3 * max(1.0, p.grad.abs().max().item()), name=f"grad {n}")


@pytest.mark.gpu
def test_convit_small_logits_match_reference():
    import convit

    torch.manual_seed(0)
    model = convit.create_model("convit_small", gpsa_backend="reference").cuda().eval()
    x = torch.randn(8, 3, 224, 224, device="cuda")
    with _no_tf32(), torch.no_grad():
        expected = model(x)
        convit.swap_gpsa(model, backend="triton")
        got = model(x)
        assert_close(got, expected, atol=1e-4 * max(1.0, expected.abs().max().item()), name="convit_small fp32")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got_bf16 = model(x).float()
            convit.swap_gpsa(model, backend="reference")
            ref_bf16 = model(x).float()
        # Both in bf16 autocast: the fused kernel must not be worse than the reference is.
        assert max_error(got_bf16, expected) <= 2.0 * max_error(ref_bf16, expected) + 1e-3


@pytest.mark.gpu
def test_auto_does_not_prefer_triton_unverified(monkeypatch):
    from convit_kernels.backends import resolve_backend

    assert "triton" in ck.available_backends("cuda")
    monkeypatch.delenv("CONVIT_KERNELS_TRUST_TRITON", raising=False)
    assert resolve_backend("auto", torch.device("cuda"), torch.bfloat16).name != "triton"
    monkeypatch.setenv("CONVIT_KERNELS_TRUST_TRITON", "1")
    assert ck.backends._REGISTRY["triton"].auto_rank("cuda") is not None  # opted in: a candidate for auto


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("N,D", [(196, 48), (197, 128), (577, 48)])
def test_every_autotune_config_on_shared_buffers(dtype, N, D, monkeypatch):
    """Each kernel's real GPU list, autotuned with a timer that makes the LAST config win: every
    config compiles and runs on the same buffers first, so anything a losing config leaves behind
    (or a config that does not bind or fit) shows in the gradients or raises."""
    import triton

    from convit_kernels import triton_bwd, triton_fwd

    def last_wins(kernel_call, quantiles=None):
        kernel_call()
        last_wins.calls += 1
        t = 1000.0 - last_wins.calls
        return [t, t, t] if quantiles else t
    last_wins.calls = 0
    for tuners, gpu_lists in ((triton_fwd._FWD_TUNERS, triton_fwd.FWD_GPU_CONFIGS),
                              (triton_bwd._DQ_TUNERS, triton_bwd.DQ_GPU_CONFIGS),
                              (triton_bwd._DKV_TUNERS, triton_bwd.DKV_GPU_CONFIGS)):
        for key, tuner in list(tuners.items()):
            monkeypatch.setitem(tuners, key, triton.autotune(
                configs=gpu_lists[key], key=list(tuner.keys), do_bench=last_wins,
                prune_configs_by=dict(early_config_prune=tuner.early_config_prune))(tuner.fn))
    _check_against_reference(2, 3, N, D, dtype)
    assert last_wins.calls >= 3


@pytest.mark.gpu
def test_compile_dynamic_shapes_two_sizes():
    """torch.compile(dynamic=True): the launchers get SymInts (aot_dispatch_dynamic) at two N."""
    def f(q, k, v, w, b, g, grid):
        return ck.gpsa_attention(q, k, v, w, b, g, grid, backend="triton")

    compiled = torch.compile(f, dynamic=True, fullgraph=True)
    for N, grid in ((196, (14, 14)), (50, (5, 10))):
        *ts, grid = make_gpsa_inputs(2, 3, N, 48, grid, dtype=torch.bfloat16, device="cuda", layout="bnhd")
        assert_close(compiled(*ts, grid), f(*ts, grid), atol=1e-2, name=f"compiled dynamic N={N}")
