"""The CUDA GPSA kernels (csrc/cuda/*.cu) run on the CPU by a small emulator, against the reference.

No GPU is needed: the .cu sources are compiled by g++ with tests/cuda_emulator/emu_cuda.h standing
in for the CUDA runtime (threads of a CTA as cooperative fibers with real __syncthreads and warp
shuffle barriers; CTAs one after the other; shared memory initialised to NaN). This checks the
kernels' index arithmetic, masking, barriers, the online softmax, the backward algebra and the
deterministic reductions, for float64, float32, float16 and bfloat16, incl. the tensor-core kernels:
WMMA, and the mma.sync forward, whose mma.sync / ldmatrix / cp.async the emulator runs with the PTX
per-lane fragment layouts (tested on their own below; the emulator cannot see memory-model races:
tests/test_cuda_gpu.py covers those on a GPU). Each output is
written into a NaN-filled buffer with guard zones: an unwritten element or a write out of bounds
fails the test.
"""
import ctypes
import pathlib
import re
import shutil
import subprocess

import pytest
import torch

from convit_kernels.reference import gpsa_reference
from convit_kernels.testing import (
    assert_close, assert_within_reference_rule, make_gpsa_inputs, reference_errors,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
EMU_DIR = pathlib.Path(__file__).resolve().parent / "cuda_emulator"
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}  # GpsaDtype in gpsa_cuda.h
LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[\w:]+>)?)<<<(.*?)>>>\(")
SMEM_DECL = re.compile(r"extern __shared__ __align__\(\d+\) unsigned char smem_raw\[\];")


def _emulated_source(text):
    """The .cu text with kernel launches and dynamic shared memory routed to the emulator."""
    text, n_smem = SMEM_DECL.subn("unsigned char* smem_raw = emu::dynamic_smem();", text)
    text, n_launch = LAUNCH.subn(r"emu::launch(\1, \2)(", text)
    assert "<<<" not in text, "a kernel launch the emulator transform did not recognise"
    return text, n_smem, n_launch


@pytest.fixture(scope="module")
def emu_lib(tmp_path_factory):
    gxx = shutil.which("g++") or shutil.which("c++")
    if gxx is None:
        pytest.skip("no C++ compiler (g++) on PATH to build the CUDA emulator")
    tmp = tmp_path_factory.mktemp("cuda_emu")
    (tmp / "fake").mkdir()
    for name in ("cuda_runtime.h", "cuda_fp16.h", "cuda_bf16.h", "mma.h"):
        (tmp / "fake" / name).write_text("#pragma once\n")
    for header in CUDA_DIR.glob("*.h"):
        shutil.copy(header, tmp / header.name)
    sources, launches, smem_decls = [], 0, 0
    for src in sorted(CUDA_DIR.glob("*.cu")) + sorted(CUDA_DIR.glob("*.cuh")):
        text, n_smem, n_launch = _emulated_source(src.read_text())
        launches, smem_decls = launches + n_launch, smem_decls + n_smem
        if src.suffix == ".cuh":
            (tmp / src.name).write_text(text)
        else:
            out = tmp / (src.stem + "_emu.cpp")
            out.write_text(text)
            sources.append(str(out))
    assert launches >= 2 and smem_decls >= 5, "the emulator transform found fewer launches than expected"
    lib = tmp / "libgpsa_emu.so"
    cmd = [gxx, "-std=c++17", "-O2", "-fPIC", "-shared", "-include", str(EMU_DIR / "emu_cuda.h"),
           f"-I{tmp / 'fake'}", f"-I{tmp}", *sources, str(EMU_DIR / "emu_entry.cpp"), "-o", str(lib)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"building the CUDA emulator failed:\n{proc.stderr[-6000:]}"
    return ctypes.CDLL(str(lib))


GUARD = 64  # elements of NaN before and after every output


def _guarded(shape, dtype):
    """A NaN-filled buffer with guard zones; returns (flat buffer, view of the payload)."""
    numel = 1
    for s in shape:
        numel *= s
    flat = torch.full((numel + 2 * GUARD,), float("nan"), dtype=dtype)
    return flat, flat[GUARD:GUARD + numel].view(*shape)


def _check_guards(flat, name):
    assert torch.isnan(flat[:GUARD]).all() and torch.isnan(flat[-GUARD:]).all(), f"{name}: write out of bounds"


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr())


def _strides(*tensors):
    vals = [s for t in tensors for s in (t.stride(0), t.stride(1), t.stride(2))]
    return (ctypes.c_int64 * len(vals))(*vals)


def _emu_forward(lib, q, k, v, w, g, rows, cols, scale):
    B, H, N, D = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out_flat, out_bnhd = _guarded((B, N, H, D), q.dtype)
    out = out_bnhd.transpose(1, 2)
    lse_flat, lse = _guarded((B, H, N), acc)
    pos_lse = torch.full((H * N,), float("nan"), dtype=acc)
    sizes = (ctypes.c_int * 6)(B, H, N, D, rows, cols)
    rc = lib.emu_gpsa_fwd(DTYPE_CODES[q.dtype], sizes, ctypes.c_double(scale), _ptr(q), _ptr(k), _ptr(v),
                          _strides(q, k, v, out), _ptr(w), _ptr(g), _ptr(out), _ptr(lse), _ptr(pos_lse))
    assert rc == 0, f"emu_gpsa_fwd returned {rc}"
    _check_guards(out_flat, "out")
    _check_guards(lse_flat, "lse")
    return out, lse


def _emu_backward(lib, go, q, k, v, w, g, lse, rows, cols, scale):
    B, H, N, D = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    grads = [_guarded((B, N, H, D), q.dtype) for _ in range(3)]
    dq, dk, dv = (view.transpose(1, 2) for _, view in grads)
    dw_flat, dw = _guarded((H, 3), acc)
    dg_flat, dg = _guarded((H,), acc)
    ws = (ctypes.c_int64 * 3)()
    lib.emu_bwd_workspace(B, H, N, ws)
    pos_lse, delta_c, partials = (torch.full((int(n),), float("nan"), dtype=acc) for n in ws)
    sizes = (ctypes.c_int * 6)(B, H, N, D, rows, cols)
    rc = lib.emu_gpsa_bwd(DTYPE_CODES[q.dtype], sizes, ctypes.c_double(scale), _ptr(go), _ptr(q), _ptr(k), _ptr(v),
                          _strides(go, q, k, v, dq, dk, dv), _ptr(w), _ptr(g), _ptr(lse), _ptr(dq), _ptr(dk),
                          _ptr(dv), _ptr(dw), _ptr(dg), _ptr(pos_lse), _ptr(delta_c), _ptr(partials))
    assert rc == 0, f"emu_gpsa_bwd returned {rc}"
    for (flat, _), name in zip(grads, ("grad_q", "grad_k", "grad_v")):
        _check_guards(flat, name)
    _check_guards(dw_flat, "grad_pos_weight")
    _check_guards(dg_flat, "grad_gating")
    return dq, dk, dv, dw, dg


# (B, H, N, D, grid): whole-row path (N <= 256) incl. N below one key chunk and D = 128; the tiled
# online-softmax path (N > 256) with a non-square grid and a partial last key chunk. For fp16/bf16,
# D % 16 == 0 takes the WMMA kernels (whole-row or tiled forward, backward; D = 48: three k steps;
# D = 128: two output tiles per warp); other D the SIMT kernels.
CASES = [
    (2, 2, 50, 24, (5, 10)),
    (1, 2, 7, 8, (7, 1)),
    (1, 1, 33, 128, (3, 11)),
    (2, 2, 50, 48, (5, 10)),
    (1, 1, 300, 40, (15, 20)),
]
# The 64-row whole-row tensor-core kernels (the mma.sync forward, the WMMA rows64 backward): besides
# CASES[2] (D = 128: kSteps 8, 32-key tiles), CASES[3] (D = 48, the exact instance) and N = 70 (D = 16:
# guarded k steps; a second CTA with one active warp): the ConViT shape (14 x 14, D = 48: 4 CTAs, the
# last one partly past N; 4 key tiles, so cp.async groups in flight) and a one-column grid (table of
# 33 x 1 entries) with a partly masked last key tile.
LOW_CASES = [CASES[2], CASES[3], (1, 2, 70, 16, (7, 10)), (1, 1, 196, 48, (14, 14)), (1, 1, 17, 32, (17, 1)),
             (1, 1, 300, 32, (15, 20)), (1, 1, 270, 128, (15, 18)), CASES[0], CASES[4]]


def _run_emulated(lib, q, k, v, w, g, grid, go, scale):
    rows, cols = grid
    out, lse = _emu_forward(lib, q, k, v, w, g, rows, cols, scale)
    grads = _emu_backward(lib, go, q, k, v, w, g, lse, rows, cols, scale)
    again = _emu_backward(lib, go, q, k, v, w, g, lse, rows, cols, scale)
    for name, t, t2 in zip(("grad_q", "grad_k", "grad_v", "grad_pos_weight", "grad_gating"), grads, again):
        assert torch.equal(t, t2), f"{name} differs between identical runs"
    return out, lse, grads


def _content_lse(q, k, scale):
    return torch.logsumexp(scale * q.double() @ k.double().transpose(-2, -1), dim=-1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("B,H,N,D,grid", CASES, ids=lambda c: str(c))
def test_emulated_kernels_match_reference(emu_lib, dtype, B, H, N, D, grid):
    gen = torch.Generator().manual_seed(N * 1000 + D)
    q, k, v, w, b, g, _ = make_gpsa_inputs(B, H, N, D, grid, dtype=dtype, layout="bnhd", generator=gen)
    scale = D ** -0.5
    go = torch.randn(B, N, H, D, generator=gen, dtype=torch.float64).to(dtype).transpose(1, 2)  # strided too
    out, lse, (dq, dk, dv, dw, dg) = _run_emulated(emu_lib, q, k, v, w, g, grid, go, scale)

    ref_in = [t.double().requires_grad_(True) for t in (q, k, v, w, b, g)]
    expected = gpsa_reference(*ref_in, grid, scale)
    want = torch.autograd.grad(expected, ref_in, go.double())
    want_lse = _content_lse(q, k, scale)
    # float64: rounding only (1e-12 / 1e-11 of the largest entry). float32: the project's fp32 rule
    # (convit_kernels.testing.assert_within_reference_rule).
    got = {"grad_q": dq, "grad_k": dk, "grad_v": dv, "grad_pos_weight": dw, "grad_gating": dg}
    if dtype == torch.float64:
        assert_close(out, expected, atol=1e-12 * max(1.0, expected.abs().max().item()), name="out")
        for (name, t), idx in zip(got.items(), (0, 1, 2, 3, 5)):
            assert_close(t, want[idx], atol=1e-11 * max(1.0, want[idx].abs().max().item()), name=name)
    else:
        _, _, ref_err_out, ref_err_grads = reference_errors((q, k, v, w, b, g, grid), torch.float32, go.float())
        assert_within_reference_rule("out", out, expected, ref_err_out, dtype, gradient=False)
        for (name, t), idx in zip(got.items(), (0, 1, 2, 3, 5)):
            assert_within_reference_rule(name, t, want[idx], ref_err_grads[idx], dtype, gradient=True)
    lse_tol = (1e-12 if dtype == torch.float64 else 2e-5) * max(1.0, want_lse.abs().max().item())
    assert_close(lse, want_lse, atol=lse_tol, name="lse")


# bf16 on every case; fp16 (the same code with another conversion) on one tensor-core and one SIMT case.
LOW_PARAMS = [(torch.bfloat16, *c) for c in LOW_CASES] + [(torch.float16, *LOW_CASES[1]), (torch.float16, *CASES[0])]


@pytest.mark.parametrize("dtype,B,H,N,D,grid", LOW_PARAMS, ids=lambda c: str(c))
def test_emulated_low_precision_by_the_2x_rule(emu_lib, dtype, B, H, N, D, grid):
    gen = torch.Generator().manual_seed(N * 1000 + D + 7)
    inputs = make_gpsa_inputs(B, H, N, D, grid, dtype=dtype, layout="bnhd", generator=gen)
    q, k, v, w, b, g, _ = inputs
    scale = D ** -0.5
    go = torch.randn(B, N, H, D, generator=gen).to(dtype).transpose(1, 2)
    out, lse, grads = _run_emulated(emu_lib, q, k, v, w, g, grid, go, scale)
    out64, grads64, ref_err_out, ref_err_grads = reference_errors(inputs, dtype, go.float())
    # docs/DESIGN.md section 4: at most 2x (3x for gradients) the error of the reference run in dtype.
    assert_within_reference_rule("out", out, out64, ref_err_out, dtype, gradient=False)
    for name, t, idx in zip(("grad_q", "grad_k", "grad_v", "grad_pos_weight", "grad_gating"), grads, (0, 1, 2, 3, 5)):
        assert_within_reference_rule(name, t, grads64[idx], ref_err_grads[idx], dtype, gradient=True)
    # lse: fp32 sums of products of dtype inputs; relative rounding ~1e-6 of the largest logit.
    want_lse = _content_lse(q, k, scale)
    assert_close(lse, want_lse, atol=1e-5 * max(1.0, want_lse.abs().max().item()), name="lse")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_emulated_unaligned_strided_views(emu_lib, dtype):
    """q, k, v sliced out of wider rows (row stride H * (D + 1), base off by one element): the
    element-wise load path, not the 16-byte vector one; the result must not change."""
    B, H, N, D, grid = 1, 2, 50, 48, (5, 10)
    gen = torch.Generator().manual_seed(11)
    inputs = make_gpsa_inputs(B, H, N, D, grid, dtype=dtype, layout="bnhd", generator=gen)
    q, k, v, w, b, g, _ = inputs
    wide = [torch.zeros(B, N, H, D + 1, dtype=dtype) for _ in range(3)]
    views = []
    for buf, t in zip(wide, (q, k, v)):
        buf[..., 1:] = t.transpose(1, 2)
        views.append(buf[..., 1:].transpose(1, 2))
    assert views[0].stride(-1) == 1 and views[0].data_ptr() % 16 != 0
    scale = D ** -0.5
    go = torch.randn(B, N, H, D, generator=gen).to(dtype).transpose(1, 2)
    out_a, lse_a, grads_a = _run_emulated(emu_lib, q, k, v, w, g, grid, go, scale)
    out_b, lse_b, grads_b = _run_emulated(emu_lib, *views, w, g, grid, go, scale)
    assert torch.equal(out_a, out_b) and torch.equal(lse_a, lse_b)
    for name, x, y in zip(("grad_q", "grad_k", "grad_v", "grad_pos_weight", "grad_gating"), grads_a, grads_b):
        assert torch.equal(x, y), f"{name} depends on the load path"


def test_emulated_whole_row_falls_back_where_shared_memory_is_short(emu_lib, monkeypatch):
    """The 64-row tensor-core kernels keep all keys' rows in shared memory; on a GPU that cannot
    give a block that much (sm_86/89: 99 KB, sm_80: 163 KB) N <= 256 must take the tiled forward
    and the 16-row backward, with the partial sums counted for 16-row CTAs. The emulated device
    reports 16 KB here, so every bf16 tensor-core case takes those kernels."""
    B, H, N, D, grid = 2, 2, 50, 48, (5, 10)
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(21)
    inputs = make_gpsa_inputs(B, H, N, D, grid, dtype=dtype, layout="bnhd", generator=gen)
    q, k, v, w, b, g, _ = inputs
    scale = D ** -0.5
    go = torch.randn(B, N, H, D, generator=gen).to(dtype).transpose(1, 2)
    out_w, lse_w, grads_w = _run_emulated(emu_lib, q, k, v, w, g, grid, go, scale)
    monkeypatch.setenv("EMU_MAX_SMEM_OPTIN", str(16 * 1024))
    out, lse, grads = _run_emulated(emu_lib, q, k, v, w, g, grid, go, scale)
    out64, grads64, ref_err_out, ref_err_grads = reference_errors(inputs, dtype, go.float())
    assert_within_reference_rule("out", out, out64, ref_err_out, dtype, gradient=False)
    for name, t, idx in zip(("grad_q", "grad_k", "grad_v", "grad_pos_weight", "grad_gating"), grads, (0, 1, 2, 3, 5)):
        assert_within_reference_rule(name, t, grads64[idx], ref_err_grads[idx], dtype, gradient=True)
    # Other kernels ran: their fp32 sums round differently somewhere.
    assert not (torch.equal(out, out_w) and all(torch.equal(x, y) for x, y in zip(grads, grads_w)))


# ---- the warp primitives of csrc/cuda/gpsa_mma.cuh (mma.sync m16n8k16, ldmatrix, cp.async) ----
# Layouts written here from the PTX ISA text, independently of the emulator: g = lane // 4, t = lane % 4;
# A (16 x 16): register r holds (row g + 8 (r % 2), cols 2 t + 8 (r // 2) + {0, 1});
# B (16 x 8): register r holds (k 2 t + 8 r + {0, 1}, col g); C (16 x 8): c[i] = (g + 8 (i // 2), 2 t + i % 2).
def _a_layout(lane, r, e):
    g, t = divmod(lane, 4)
    return g + 8 * (r % 2), 2 * t + 8 * (r // 2) + e


def _b_layout(lane, r, e):
    g, t = divmod(lane, 4)
    return 2 * t + 8 * r + e, g


def _c_layout(lane, i):
    g, t = divmod(lane, 4)
    return g + 8 * (i // 2), 2 * t + i % 2


# Deliberately wrong lane mappings: each must make the emulated product differ from the matmul.
WRONG_A = {
    "rows g and g + 8 swapped": lambda lane, r, e: _a_layout(lane, r ^ 1, e),
    "column halves swapped": lambda lane, r, e: _a_layout(lane, r ^ 2, e),
    "pair order reversed": lambda lane, r, e: _a_layout(lane, r, 1 - e),
    "lane transposed": lambda lane, r, e: _a_layout((lane % 4) * 8 + lane // 4, r, e),
}


def _bits(x):
    return x.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF


def _fragments(mat, layout, nregs):
    """Per-lane registers (32 x nregs, uint32) of `mat` (16-bit) under `layout`."""
    bits = _bits(mat)
    vals = []
    for lane in range(32):
        for r in range(nregs):
            lo, hi = (bits[layout(lane, r, e)].item() for e in (0, 1))
            vals.append(lo | hi << 16)
    return (ctypes.c_uint32 * len(vals))(*vals)


def _emu_mma(lib, dtype, fa, fb, c):
    d = (ctypes.c_float * 128)(*[c[_c_layout(lane, i)].item() for lane in range(32) for i in range(4)])
    lib.emu_test_mma(int(dtype == torch.bfloat16), fa, fb, d)
    out = torch.empty(16, 8, dtype=torch.float64)
    for lane in range(32):
        for i in range(4):
            out[_c_layout(lane, i)] = d[lane * 4 + i]
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_emulated_mma_m16n8k16_fragment_layout(emu_lib, dtype):
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(16, 16, generator=gen).to(dtype)
    b = torch.randn(16, 8, generator=gen).to(dtype)
    c = torch.randn(16, 8, generator=gen)
    want = a.double() @ b.double() + c.double()
    got = _emu_mma(emu_lib, dtype, _fragments(a, _a_layout, 4), _fragments(b, _b_layout, 2), c)
    assert_close(got, want, atol=1e-4, name="mma.sync m16n8k16")
    for name, wrong in WRONG_A.items():
        bad = _emu_mma(emu_lib, dtype, _fragments(a, wrong, 4), _fragments(b, _b_layout, 2), c)
        assert (bad - want).abs().max() > 1e-2, f"the A mapping '{name}' was not caught"
    bad = _emu_mma(emu_lib, dtype, _fragments(a, _a_layout, 4),
                   _fragments(b, lambda lane, r, e: _b_layout(lane, 1 - r, e), 2), c)
    assert (bad - want).abs().max() > 1e-2, "B registers swapped were not caught"


@pytest.mark.parametrize("num", [1, 2, 4])
@pytest.mark.parametrize("trans", [False, True])
def test_emulated_ldmatrix_layout(emu_lib, num, trans):
    """Register m of lane l: (row l // 4, cols 2 (l % 4) + {0, 1}) of matrix m, whose rows are
    addressed by lanes 8 m .. 8 m + 7; with .trans the transpose. Lanes address rows in a random order."""
    gen = torch.Generator().manual_seed(num * 2 + trans)
    n_rows = 40
    rows = torch.randint(0, 1 << 16, (n_rows, 8), generator=gen, dtype=torch.int64)
    row_of_lane = torch.randperm(n_rows, generator=gen)[:32]
    src = (ctypes.c_uint16 * (n_rows * 8))(*rows.flatten().tolist())
    lanes = (ctypes.c_int * 32)(*row_of_lane.tolist())
    out = (ctypes.c_uint32 * 128)()
    emu_lib.emu_test_ldmatrix(num, int(trans), src, n_rows, lanes, out)
    for lane in range(32):
        for m in range(num):
            mat = rows[row_of_lane[8 * m:8 * m + 8]]  # 8 x 8: row rr from lane 8 m + rr
            if trans:
                mat = mat.t()
            lo, hi = mat[lane // 4, 2 * (lane % 4)].item(), mat[lane // 4, 2 * (lane % 4) + 1].item()
            assert out[lane * 4 + m] == lo | hi << 16, f"ldmatrix x{num} trans={trans}: lane {lane}, matrix {m}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("trans", [False, True])
def test_emulated_ldmatrix_then_mma_is_a_matmul(emu_lib, dtype, trans):
    """The operand path of the mma.sync kernels: A through ldmatrix.x4, B through ldmatrix.x2 from B^T
    rows (how K is stored) or .trans from B rows (how V is stored), then mma: D = A B."""
    gen = torch.Generator().manual_seed(17 + trans)
    a = torch.randn(16, 16, generator=gen).to(dtype)
    b = torch.randn(16, 8, generator=gen).to(dtype)
    b_stored = b if trans else b.t().contiguous()
    d = (ctypes.c_float * 128)()
    emu_lib.emu_test_ldsm_mma(int(dtype == torch.bfloat16), int(trans),
                              (ctypes.c_uint16 * 256)(*_bits(a).flatten().tolist()),
                              (ctypes.c_uint16 * 128)(*_bits(b_stored).flatten().tolist()), d)
    got = torch.tensor(list(d), dtype=torch.float64).view(16, 8)
    assert_close(got, a.double() @ b.double(), atol=1e-4, name="ldmatrix + mma")


def test_emulated_cp_async_lands_at_its_wait_group(emu_lib):
    """Copies land only when wait_group completes their group (oldest first); src-size 0 writes zeros."""
    gen = torch.Generator().manual_seed(3)
    src = torch.randint(0, 256, (1024,), generator=gen, dtype=torch.int64)
    zero = [1 if lane in (3, 20) else 0 for lane in range(32)]
    seen = (ctypes.c_ubyte * 3072)()
    emu_lib.emu_test_cp_async((ctypes.c_ubyte * 1024)(*src.tolist()), (ctypes.c_int * 32)(*zero), seen)
    seen = torch.tensor(list(seen), dtype=torch.int64).view(3, 1024)
    want = src.clone().view(2, 32, 16)
    want[:, [3, 20]] = 0
    want = want.view(1024)
    assert (seen[0] == 0xAB).all(), "a copy landed before its wait_group"
    assert torch.equal(seen[1, :512], want[:512]) and (seen[1, 512:] == 0xAB).all(), "wait_group 1"
    assert torch.equal(seen[2], want), "wait_group 0"


def test_emulated_mma_sync_forward_negative_scale_and_repeats(emu_lib):
    """The mma.sync forward (bf16, D = 48, N <= 256) with a negative scale, where its Q fragments flip
    sign so that the running max is taken on the raw scores: the 2x rule against the reference run
    with the same scale, and bitwise equal output and lse over repeated calls."""
    B, H, N, D, grid = 1, 2, 50, 48, (5, 10)
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(31)
    q, k, v, w, b, g, _ = make_gpsa_inputs(B, H, N, D, grid, dtype=dtype, layout="bnhd", generator=gen)
    scale = -0.4
    out, lse = _emu_forward(emu_lib, q, k, v, w, g, *grid, scale)
    out2, lse2 = _emu_forward(emu_lib, q, k, v, w, g, *grid, scale)
    assert torch.equal(out, out2) and torch.equal(lse, lse2), "the forward differs between identical runs"
    want = gpsa_reference(*(t.double() for t in (q, k, v, w, b, g)), grid, scale)
    low = gpsa_reference(q, k, v, w.float(), b.float(), g.float(), grid, scale)
    assert_within_reference_rule("out", out, want, (low.double() - want).abs().max().item(), dtype, gradient=False)
    want_lse = _content_lse(q, k, scale)
    assert_close(lse, want_lse, atol=1e-5 * max(1.0, want_lse.abs().max().item()), name="lse")


def test_emulated_mma_sync_forward_logits_far_below_zero(emu_lib):
    """Every content logit of a row near -100 (q anti-parallel to every key): the padded keys past N
    (zero K rows, logit 0) must not enter the running max, or 2^(logit - max) underflows to 0 and the
    row sum with it. bf16, N = 50 (keys 50 .. 63 padded), D = 48: the mma.sync forward."""
    B, H, N, D, grid = 1, 1, 50, 48, (5, 10)
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(41)
    q, k, v, w, b, g, _ = make_gpsa_inputs(B, H, N, D, grid, dtype=dtype, layout="bnhd", generator=gen)
    u = torch.randn(D, generator=gen)
    u = u / u.norm()
    k = (u + 0.01 * torch.randn(B, H, N, D, generator=gen)).to(dtype)
    q = (-100.0 * D ** 0.5 * u.expand(B, H, N, D)).to(dtype)
    scale = D ** -0.5
    out, lse = _emu_forward(emu_lib, q, k, v, w, g, *grid, scale)
    want = gpsa_reference(*(t.double() for t in (q, k, v, w, b, g)), grid, scale)
    low = gpsa_reference(q, k, v, w.float(), b.float(), g.float(), grid, scale)
    assert_within_reference_rule("out", out, want, (low.double() - want).abs().max().item(), dtype, gradient=False)
