"""The CUDA GPSA kernels (backend "cuda", csrc/cuda/) on a GPU: precision, sizes, paths,
determinism, races, compute-sanitizer, opcheck, torch.compile and the ConViT model.

Every test is marked ``gpu`` (skipped by tests/conftest.py where CUDA is absent). The backend is
opt-in until a GPU run has verified it: each test sets CONVIT_KERNELS_ENABLE_CUDA=1 first (the
``cuda_backend`` fixture). The nvcc compile check of the same sources runs everywhere
(tests/test_cuda_compile.py).
"""
import contextlib
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import convit_kernels as ck
from convit_kernels.testing import (
    assert_close, assert_within_reference_rule, make_gpsa_inputs, max_error, reference_errors,
)

NAMES = ("out", "grad_q", "grad_k", "grad_v", "grad_pos_weight", "grad_pos_bias", "grad_gating")
# Odd N (50, 197, 577), non-square grids, both sides of the whole-row limit (256).
GRIDS = {50: (5, 10), 196: (14, 14), 197: (1, 197), 256: (16, 16), 257: (1, 257), 300: (15, 20), 577: (1, 577),
         576: (24, 24)}
ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def cuda_backend(monkeypatch):
    """Opts in to the unverified CUDA backend; fails (not skips) with the reason if it cannot run."""
    monkeypatch.setenv("CONVIT_KERNELS_ENABLE_CUDA", "1")
    status = ck.backend_status("cuda")["cuda"]
    if status != "available":
        pytest.fail(f"backend 'cuda' is not available on this GPU machine: {status}")
    return "cuda"


@contextlib.contextmanager
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _run(inputs, grad_out):
    *tensors, grid = inputs
    ts = [t.detach().requires_grad_(True) for t in tensors]
    out = ck.gpsa_attention(*ts, grid, backend="cuda")
    grads = torch.autograd.grad(out, ts, grad_out.to(out.dtype))
    return [out] + list(grads)


def _check_against_reference(B, H, N, D, dtype, layout="bnhd"):
    inputs = make_gpsa_inputs(B, H, N, D, GRIDS[N], dtype=dtype, device="cuda", layout=layout)
    # Representable in dtype, so its rounding is not counted as the kernel's error.
    grad_out = torch.randn(B, H, N, D, device="cuda").to(dtype).float()
    with _no_tf32():
        out64, grads64, ref_err_out, ref_err_grads = reference_errors(inputs, dtype, grad_out)
        results = _run(inputs, grad_out)
    out = results[0]
    assert out.dtype == dtype and out.shape == (B, H, N, D)
    assert out.transpose(1, 2).is_contiguous(), "out must be laid out as (B, N, H, D)"
    assert results[5].abs().max().item() == 0.0, "grad of pos_bias must be exactly zero"
    for i, (name, got, want) in enumerate(zip(NAMES, results, (out64, *grads64))):
        if name == "grad_pos_bias":
            continue
        # The kernels use IEEE FMA and library expf/logf (no fast math), as the fp32 rule needs.
        ref_err = ref_err_out if i == 0 else ref_err_grads[i - 1]
        assert_within_reference_rule(name, got, want, ref_err, dtype, gradient=i > 0, context=f", N={N}, D={D}")


SHAPES = [(50, 48), (197, 16), (197, 32), (197, 48), (197, 64), (197, 128), (196, 48), (256, 64), (257, 48),
          (577, 48), (577, 128), (300, 64)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("N,D", SHAPES)
def test_forward_and_gradients_match_reference(cuda_backend, dtype, N, D):
    _check_against_reference(2, 3, N, D, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("N", [50, 577])
def test_contiguous_bhnd_inputs(cuda_backend, N):
    _check_against_reference(2, 3, N, 32, torch.float32, layout="bhnd")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_odd_head_dims(cuda_backend, dtype):
    """D not a multiple of 16 (8, 24, 40, 100): no hidden padding; fp16/bf16 take the SIMT kernels
    there (the tensor-core ones need D % 16 == 0), so this covers those for 16-bit inputs."""
    for D in (8, 24, 40, 100):
        _check_against_reference(1, 2, 50, D, dtype)
        _check_against_reference(1, 2, 300, D, dtype)


@pytest.mark.gpu
def test_unaligned_views_give_identical_results(cuda_backend):
    """q, k, v sliced from wider rows (no 16-byte vector loads possible): bitwise the same results."""
    B, H, N, D = 2, 3, 197, 48
    inputs = make_gpsa_inputs(B, H, N, D, GRIDS[N], dtype=torch.bfloat16, device="cuda", layout="bnhd")
    *ts, grid = inputs
    views = []
    for t in ts[:3]:
        wide = torch.zeros(B, N, H, D + 1, dtype=t.dtype, device="cuda")
        wide[..., 1:] = t.transpose(1, 2)
        views.append(wide[..., 1:].transpose(1, 2))
    grad_out = torch.randn(B, H, N, D, device="cuda")
    first = _run(inputs, grad_out)
    second = _run((*views, *ts[3:], grid), grad_out)
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), f"{name} depends on the alignment of q, k, v"


@pytest.mark.gpu
def test_many_batch_heads(cuda_backend):
    """B * H = 4096 (ConViT-B at B = 256): grid limits and indexing, bf16 by the 2x rule."""
    _check_against_reference(256, 16, 196, 48, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("N", [50, 300])
def test_float64_ops_match_reference(cuda_backend, N):
    """The raw ops in float64 (whole-row and tiled paths): agreement to ~1e-12, lse included."""
    B, H, D = 2, 3, 24
    q, k, v, w, b, g, (rows, cols) = make_gpsa_inputs(B, H, N, D, GRIDS[N], dtype=torch.float64, device="cuda",
                                                      layout="bnhd", requires_grad=True)
    scale = D ** -0.5
    out, lse = torch.ops.convit_kernels.gpsa_fwd(q, k, v, w, g, rows, cols, scale)
    expected = ck.gpsa_reference(q, k, v, w, b, g, (rows, cols), scale)
    assert_close(out, expected, atol=1e-11, name="out float64")
    assert_close(lse, torch.logsumexp(scale * q @ k.transpose(-2, -1), dim=-1), atol=1e-11, name="lse float64")
    grad_out = torch.randn_like(expected)
    want = torch.autograd.grad(expected, (q, k, v, w, g), grad_out)
    got = torch.ops.convit_kernels.gpsa_bwd(grad_out, q.detach(), k.detach(), v.detach(), w.detach(), g.detach(),
                                            lse, rows, cols, scale)
    for name, a, e in zip(("grad_q", "grad_k", "grad_v", "grad_pos_weight", "grad_gating"), got, want):
        assert_close(a, e, atol=1e-10 * max(1.0, e.abs().max().item()), name=f"{name} float64")


@pytest.mark.gpu
def test_lse_is_content_logsumexp(cuda_backend):
    q, k, v, w, b, g, (rows, cols) = make_gpsa_inputs(2, 3, 197, 64, (1, 197), dtype=torch.bfloat16, device="cuda",
                                                      layout="bnhd")
    scale = 64 ** -0.5
    _, lse = torch.ops.convit_kernels.gpsa_fwd(q, k, v, w, g, rows, cols, scale)
    assert lse.dtype == torch.float32 and lse.shape == (2, 3, 197)
    expected = torch.logsumexp(scale * q.double() @ k.double().transpose(-2, -1), dim=-1)
    # fp32 accumulation of bf16 inputs: the logits round at ~1e-6 relative, lse likewise.
    assert_close(lse, expected, atol=1e-4, name="lse")


@pytest.mark.gpu
def test_backward_deterministic_over_50_repeats(cuda_backend):
    inputs = make_gpsa_inputs(32, 9, 196, 48, (14, 14), dtype=torch.bfloat16, device="cuda", layout="bnhd")
    grad_out = torch.randn(32, 9, 196, 48, device="cuda")
    first = _run(inputs, grad_out)
    for _ in range(50):
        again = _run(inputs, grad_out)
        for name, a, b in zip(NAMES, first, again):
            assert torch.equal(a, b), f"{name} differs between identical runs"


@pytest.mark.gpu
@pytest.mark.parametrize("N", [196, 577])
def test_no_races_at_large_batch(cuda_backend, N):
    """Large grid, many repeats: every run bitwise equal and close to the composed baseline."""
    B, H, D = (512, 4, 48) if N == 196 else (64, 4, 64)
    inputs = make_gpsa_inputs(B, H, N, D, GRIDS[N], dtype=torch.float16, device="cuda", layout="bnhd")
    grad_out = torch.randn(B, H, N, D, device="cuda")
    first = _run(inputs, grad_out)
    with _no_tf32():
        *ts, grid = inputs
        expected = ck.gpsa_composed(*(t.float() for t in ts), grid)
    # fp16 storage of the output: 2^-11 relative to |out| <= a few.
    assert_close(first[0], expected, atol=1e-2, name="out vs composed fp32")
    for _ in range(20):
        again = _run(inputs, grad_out)
        for name, a, b in zip(NAMES, first, again):
            assert torch.equal(a, b), f"{name} differs between identical runs"


_SANITIZER_SCRIPT = textwrap.dedent("""
    import os, torch
    os.environ["CONVIT_KERNELS_ENABLE_CUDA"] = "1"
    import convit_kernels as ck
    from convit_kernels.testing import make_gpsa_inputs
    for dtype in (torch.float32, torch.bfloat16):
        # whole-row / tiled forward; SIMT (D = 40) and, for bf16, tensor-core (D % 16 == 0) kernels
        for N, grid, D in ((50, (5, 10), 48), (300, (15, 20), 40), (300, (15, 20), 32)):
            *ts, grid = make_gpsa_inputs(2, 2, N, D, grid, dtype=dtype, device="cuda", layout="bnhd",
                                         requires_grad=True)
            out = ck.gpsa_attention(*ts, grid, backend="cuda")
            out.backward(torch.randn_like(out))
    torch.cuda.synchronize()
    print("sanitizer script done")
""")


def _compute_sanitizer():
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    from torch.utils import cpp_extension
    for home in (os.environ.get("CUDA_HOME"), cpp_extension.CUDA_HOME, "/usr/local/cuda"):
        if home and (pathlib.Path(home) / "bin" / "compute-sanitizer").exists():
            return str(pathlib.Path(home) / "bin" / "compute-sanitizer")
    return None


@pytest.mark.gpu
@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_compute_sanitizer(cuda_backend, tool, tmp_path):
    sanitizer = _compute_sanitizer()
    if sanitizer is None:
        pytest.skip("compute-sanitizer not found (PATH, CUDA_HOME)")
    script = tmp_path / "gpsa_small.py"
    script.write_text(_SANITIZER_SCRIPT)
    # No caching allocator: every tensor is its own allocation, so an out-of-bounds access is seen.
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1", CONVIT_KERNELS_ENABLE_CUDA="1")
    # Instrument only our kernels (name substring "gpsa"): torch's own kernels are not under test.
    cmd = [sanitizer, f"--tool={tool}", "--error-exitcode=97", "--kernel-name", "kns=gpsa"]
    if tool == "memcheck":
        cmd.append("--leak-check=no")
    proc = subprocess.run(cmd + [sys.executable, str(script)], capture_output=True, text=True, env=env,
                          cwd=str(ROOT), timeout=900)
    log = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0 and "sanitizer script done" in proc.stdout, f"{tool} found problems:\n{log}"


@pytest.mark.gpu
def test_opcheck(cuda_backend):
    for N, grid, dtype in ((50, (5, 10), torch.float32), (300, (15, 20), torch.bfloat16)):
        q, k, v, w, b, g, (rows, cols) = make_gpsa_inputs(2, 3, N, 48, grid, dtype=dtype, device="cuda",
                                                          layout="bnhd", requires_grad=True)
        scale = 48 ** -0.5
        torch.library.opcheck(torch.ops.convit_kernels.gpsa_fwd.default, (q, k, v, w, g, rows, cols, scale))
        out, lse = torch.ops.convit_kernels.gpsa_fwd(q, k, v, w, g, rows, cols, scale)
        grad_out = torch.randn_like(out)
        bwd_args = tuple(t.detach() for t in (grad_out, q, k, v, w, g, lse)) + (rows, cols, scale)
        torch.library.opcheck(torch.ops.convit_kernels.gpsa_bwd.default, bwd_args)


@pytest.mark.gpu
def test_compile_fullgraph_convit_tiny_matches_eager(cuda_backend):
    import convit

    torch.manual_seed(0)
    model = convit.create_model("convit_tiny", gpsa_backend="cuda").cuda()
    for m in model.modules():
        if hasattr(m, "gating_param"):
            with torch.no_grad():
                m.gating_param.normal_()
    x = torch.randn(4, 3, 224, 224, device="cuda")
    with _no_tf32():
        model.eval()
        eager = model(x)
        got = torch.compile(model, fullgraph=True)(x)
        # fp32 throughout; inductor reorders the surrounding reductions (LayerNorm, GELU).
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
def test_convit_small_logits_match_reference(cuda_backend):
    import convit

    torch.manual_seed(0)
    model = convit.create_model("convit_small", gpsa_backend="reference").cuda().eval()
    x = torch.randn(8, 3, 224, 224, device="cuda")
    with _no_tf32(), torch.no_grad():
        expected = model(x)
        convit.swap_gpsa(model, backend="cuda")
        got = model(x)
        assert_close(got, expected, atol=1e-4 * max(1.0, expected.abs().max().item()), name="convit_small fp32")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got_bf16 = model(x).float()
            convit.swap_gpsa(model, backend="reference")
            ref_bf16 = model(x).float()
        # Both in bf16 autocast: the fused kernel must not be worse than the reference is.
        assert max_error(got_bf16, expected) <= 2.0 * max_error(ref_bf16, expected) + 1e-3


@pytest.mark.gpu
def test_cuda_backend_is_opt_in(monkeypatch):
    """Until a GPU run has verified the kernels, 'cuda' needs CONVIT_KERNELS_ENABLE_CUDA=1."""
    monkeypatch.delenv("CONVIT_KERNELS_ENABLE_CUDA", raising=False)
    assert "cuda" not in ck.available_backends("cuda")
    monkeypatch.setenv("CONVIT_KERNELS_ENABLE_CUDA", "1")
    assert "cuda" in ck.available_backends("cuda"), ck.backend_status("cuda")["cuda"]
