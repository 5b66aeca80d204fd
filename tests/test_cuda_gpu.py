"""What only the CUDA backend ("cuda", csrc/cuda/) has, on a GPU: odd head dims (its SIMT kernels),
alignment of strided views, the raw float64 ops and lse, compute-sanitizer, the opt-in.

The properties every fused backend shares (precision by the reference rule, sizes, determinism,
races, opcheck, torch.compile, the ConViT model) are tests/test_fused_gpu.py, for both backends.

Every test is marked ``gpu`` (skipped by tests/conftest.py where CUDA is absent). The backend is
opt-in until a GPU run has verified it: each test sets CONVIT_KERNELS_ENABLE_CUDA=1 first (the
``cuda_backend`` fixture). The nvcc compile check of the same sources runs everywhere
(tests/test_cuda_compile.py).
"""
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import convit_kernels as ck
from convit_kernels.testing import GRAD_NAMES as NAMES
from convit_kernels.testing import assert_close, check_against_reference, make_gpsa_inputs, output_and_grads

# Odd N (50, 197, 577), non-square grids, both sides of the whole-row limit (256).
GRIDS = {50: (5, 10), 196: (14, 14), 197: (1, 197), 256: (16, 16), 257: (1, 257), 300: (15, 20), 577: (1, 577),
         576: (24, 24)}
ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def cuda_backend(monkeypatch):
    """Opts in to the unverified CUDA backend; fails (not skips) with the reason if it cannot run."""
    monkeypatch.setenv("CONVIT_KERNELS_ENABLE_CUDA", "1")
    ck.clear_backend_cache()  # the opt-in is read when a backend is first resolved
    status = ck.backend_status("cuda")["cuda"]
    if status != "available":
        pytest.fail(f"backend 'cuda' is not available on this GPU machine: {status}")
    yield "cuda"
    ck.clear_backend_cache()


def _run(inputs, grad_out):
    return output_and_grads(lambda *a: ck.gpsa_attention(*a, backend="cuda"), inputs, grad_out)


def _check_against_reference(B, H, N, D, dtype, layout="bnhd"):
    fn = lambda q, k, v, w, b, g, grid: ck.gpsa_attention(q, k, v, w, b, g, grid, backend="cuda")  # noqa: E731
    check_against_reference(fn, B, H, N, D, dtype, GRIDS[N], layout=layout)


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
def test_cuda_backend_is_opt_in(monkeypatch):
    """Until a GPU run has verified the kernels, 'cuda' needs CONVIT_KERNELS_ENABLE_CUDA=1."""
    monkeypatch.delenv("CONVIT_KERNELS_ENABLE_CUDA", raising=False)
    ck.clear_backend_cache()
    assert "cuda" not in ck.available_backends("cuda")
    monkeypatch.setenv("CONVIT_KERNELS_ENABLE_CUDA", "1")
    ck.clear_backend_cache()
    assert "cuda" in ck.available_backends("cuda"), ck.backend_status("cuda")["cuda"]
    ck.clear_backend_cache()
