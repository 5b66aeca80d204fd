"""The portable "sdpa" backend (convit_kernels/sdpa_ops.py) against the reference, its memory bound,
torch.compile, the model, and how "auto" ranks it."""
import dataclasses

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import convit
import convit_kernels as ck
from convit_kernels import backends
from convit_kernels.backends import clear_backend_cache, resolve_backend
from convit_kernels.reference import gpsa_composed
from convit_kernels.testing import (
    assert_close, assert_compiled_matches_eager, assert_within_reference_rule, gradcheck_backend, make_gpsa_inputs,
    reference_errors,
)

NAMES = ("out", "grad_q", "grad_k", "grad_v", "grad_pos_weight", "grad_pos_bias", "grad_gating")


def _run(backend, tensors, grid, grad_out):
    ts = [t.detach().requires_grad_(True) for t in tensors]
    out = ck.gpsa_attention(*ts, grid, backend=backend)
    grads = torch.autograd.grad(out, ts, grad_out.to(out.dtype))
    return (out,) + grads


# Square and non-square grids, odd N (35, 63, 9), D from 1 to 48, both layouts.
SHAPES = [(2, 3, 12, 8, (3, 4), "bhnd"), (1, 4, 49, 16, (7, 7), "bnhd"), (3, 2, 35, 5, (5, 7), "bnhd"),
          (2, 1, 9, 1, (1, 9), "bhnd"), (2, 4, 196, 48, (14, 14), "bnhd")]


def _ids(cases):
    return [f"{c[-6]}x{c[-5]}x{c[-4]}x{c[-3]}-{c[-2][0]}x{c[-2][1]}-{c[-1]}" for c in cases]


@pytest.mark.parametrize("B,H,N,D,grid,layout", SHAPES, ids=_ids(SHAPES))
def test_float64_matches_reference(B, H, N, D, grid, layout):
    """All six gradients; in float64 both compute the same sums, so they agree to ~1e-14 of the scale.
    grad_pos_bias is exactly zero (the bias cancels; the reference gives rounding noise)."""
    q, k, v, w, b, g, grid = make_gpsa_inputs(B, H, N, D, grid, dtype=torch.float64, layout=layout)
    go = torch.randn(B, H, N, D, dtype=torch.float64)
    got = _run("sdpa", (q, k, v, w, b, g), grid, go)
    want = _run("reference", (q, k, v, w, b, g), grid, go)
    assert got[0].dtype == torch.float64
    for name, a, e in zip(NAMES, got, want):
        if name == "grad_pos_bias":
            assert torch.equal(a, torch.zeros_like(a)), "grad_pos_bias must be exactly zero"
            continue
        assert_close(a, e, atol=1e-11 * max(1.0, e.abs().max().item()), name=f"sdpa {name}")


def test_gradcheck_float64():
    assert gradcheck_backend("sdpa", 2, 2, 6, 3, (2, 3))


LOW_CASES = [(dt,) + s for dt in (torch.float32, torch.float16, torch.bfloat16) for s in SHAPES[:3]] + [
    (torch.bfloat16,) + SHAPES[4], (torch.float32,) + SHAPES[4]]


@pytest.mark.parametrize("dtype,B,H,N,D,grid,layout", LOW_CASES,
                         ids=[f"{str(c[0]).removeprefix('torch.')}-{i}" for i, c in
                              zip(_ids([c[1:] for c in LOW_CASES]), LOW_CASES)])
def test_low_precision_within_the_reference_rule(dtype, B, H, N, D, grid, layout):
    """The project's one tolerance rule (testing.assert_within_reference_rule): fp16/bf16 err at most
    2x (3x for gradients) what the reference errs in that dtype; fp32 up to 10x / 20x plus 2e-5 of
    the largest entry. The positional softmax and its backward run in float32 here and the content
    branch is SDPA's (float32 accumulation on CPU), so the low-precision cases pass with room."""
    q, k, v, w, b, g, grid = make_gpsa_inputs(B, H, N, D, grid, dtype=dtype, layout=layout)
    go = torch.randn(B, H, N, D).to(dtype).float()  # representable in dtype: every run sees the same grad_out
    out64, grads64, err_out, err_grads = reference_errors((q, k, v, w, b, g, grid), dtype, go)
    got = _run("sdpa", (q, k, v, w, b, g), grid, go.to(dtype))
    assert got[0].dtype == dtype
    for i, (name, a, e, ref_err) in enumerate(zip(NAMES, got, [out64] + list(grads64), [err_out] + err_grads)):
        if name == "grad_pos_bias":
            assert torch.equal(a, torch.zeros_like(a)), "grad_pos_bias must be exactly zero"
            continue
        assert_within_reference_rule(name, a, e, ref_err, dtype, gradient=i > 0, context=f", {(B, H, N, D, grid)}")


def test_strided_inputs_match_contiguous():
    q, k, v, w, b, g, grid = make_gpsa_inputs(2, 3, 20, 8, (4, 5), layout="bnhd")
    assert not q.is_contiguous()
    go = torch.randn(2, 3, 20, 8)
    got = _run("sdpa", (q, k, v, w, b, g), grid, go)
    want = _run("sdpa", (q.contiguous(), k.contiguous(), v.contiguous(), w, b, g), grid, go)
    for name, a, e in zip(NAMES, got, want):
        assert_close(a, e, atol=1e-6, rtol=1e-5, name=f"strided {name}")


def test_backward_is_deterministic():
    """On CPU every piece is deterministic (SDPA's CPU flash backward too): two runs agree bitwise."""
    q, k, v, w, b, g, grid = make_gpsa_inputs(3, 2, 35, 8, (5, 7), layout="bnhd")
    go = torch.randn(3, 2, 35, 8)
    first = _run("sdpa", (q, k, v, w, b, g), grid, go)
    second = _run("sdpa", (q, k, v, w, b, g), grid, go)
    for name, a, e in zip(NAMES, first, second):
        assert torch.equal(a, e), f"{name} differs between two runs"


def _largest_allocation(fn):
    """Bytes of the largest single CPU allocation reported by the profiler while ``fn`` runs."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    assert sizes, "the profiler recorded no allocation"
    return max(sizes)


def test_no_batch_by_heads_by_n_by_n_tensor():
    """No (B, H, N, N) tensor forward or backward. At B=8, H=2, N=64, D=16 the candidates are apart:
    B*H*N*N = 65536 elements, B*H*N*D = 16384 (q, k, v, out and their gradients), H*N*N = 8192 (P).
    The composed baseline, whose autograd forms dP per batch element, is the control: the same
    measurement must see its (B, H, N, N) tensor, or it proves nothing."""
    B, H, N, D = 8, 2, 64, 16
    q, k, v, w, b, g, grid = make_gpsa_inputs(B, H, N, D, (8, 8), requires_grad=True, layout="bnhd")
    go = torch.randn(B, H, N, D)
    limit = B * H * N * N * 4  # bytes of one fp32 (B, H, N, N) tensor

    def step(fn):
        def run():
            fn(q, k, v, w, b, g, grid).backward(go)
        run()  # warm-up: lazily created buffers are not part of a step
        return _largest_allocation(run)

    sdpa_largest = step(lambda *a: ck.gpsa_attention(*a, backend="sdpa"))
    assert sdpa_largest < limit, f"sdpa allocated {sdpa_largest} bytes at once; a (B, H, N, N) tensor is {limit}"
    assert sdpa_largest <= B * H * N * D * 4, f"sdpa's largest allocation {sdpa_largest} B exceeds one (B, H, N, D)"
    assert step(gpsa_composed) >= limit, "the control (gpsa_composed) should allocate a (B, H, N, N) tensor"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_opcheck_positional_op(dtype):
    q, k, v, w, b, g, (rows, cols) = make_gpsa_inputs(2, 3, 12, 8, (3, 4), dtype=dtype, requires_grad=True,
                                                      layout="bnhd")
    torch.library.opcheck(torch.ops.convit_kernels.gpsa_positional.default, (v, w, rows, cols))
    out, probs = torch.ops.convit_kernels.gpsa_positional(v, w, rows, cols)
    assert out.shape == v.shape and out.dtype == dtype and probs.shape == (3, 12, 12) and probs.dtype == w.dtype
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 12, dtype=w.dtype))


def test_positional_softmax_stays_fp32_under_autocast():
    """Under bf16 autocast (how the model trains on a GPU) P and the pos_weight gradient are still
    computed in float32: the same bits as without autocast."""
    q, k, v, w, b, g, (rows, cols) = make_gpsa_inputs(2, 3, 20, 8, (4, 5), dtype=torch.bfloat16, layout="bnhd")
    w.requires_grad_(True)
    go = torch.randn(v.shape).to(torch.bfloat16)
    out, probs = torch.ops.convit_kernels.gpsa_positional(v, w, rows, cols)
    (dw,) = torch.autograd.grad(out, w, go)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_a, probs_a = torch.ops.convit_kernels.gpsa_positional(v, w, rows, cols)
        (dw_a,) = torch.autograd.grad(out_a, w, go)
    assert probs_a.dtype == torch.float32 and torch.equal(probs_a, probs)
    assert torch.equal(out_a, out) and torch.equal(dw_a, dw)


def test_compile_fullgraph_matches_eager():
    # Same ops in both; inductor regenerates the elementwise code and may fuse differently: fp32 rounding.
    assert_compiled_matches_eager("sdpa", atol=1e-5, rtol=1e-4)


def _small_convit_tiny(backend):
    # convit_tiny's width and heads on a small non-square image (4 x 6 patches) and 2 blocks (1 GPSA, 1 MHSA),
    # so that compiling forward and backward stays within seconds on 2 cores.
    with torch.random.fork_rng():  # the same weights every time, without reseeding later tests' draws
        torch.manual_seed(0)
        return convit.create_model("convit_tiny", img_size=(32, 48), patch_size=8, num_classes=10, depth=2,
                                   local_up_to_layer=1, gpsa_backend=backend)


def test_compile_fullgraph_convit_tiny_matches_eager():
    torch.compiler.reset()
    model = _small_convit_tiny("sdpa")
    assert model.gpsa_backend == "sdpa"
    x = torch.randn(2, 3, 32, 48)
    eager = model(x)
    eager.square().sum().backward()
    grads_e = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    out = torch.compile(model, fullgraph=True)(x)
    out.square().sum().backward()
    assert_close(out, eager, atol=1e-5 * max(1.0, eager.abs().max().item()), rtol=1e-4, name="compiled logits")
    for n, p in model.named_parameters():
        scale = max(1.0, grads_e[n].abs().max().item())
        assert_close(p.grad, grads_e[n], atol=1e-5 * scale, rtol=1e-3, name=f"compiled grad {n}")
    torch.compiler.reset()


def test_swap_gpsa_to_sdpa_matches_reference():
    model = _small_convit_tiny("reference").eval()
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        ref = model(x)
        convit.swap_gpsa(model, "sdpa")
        got = model(x)
    assert model.gpsa_backend == "sdpa"
    assert_close(got, ref, atol=1e-5 * max(1.0, ref.abs().max().item()), name="logits sdpa vs reference")


# --- "auto" and the registry --------------------------------------------------------------------

@pytest.fixture
def fresh_cache():
    clear_backend_cache()
    yield
    clear_backend_cache()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_auto_on_a_non_cpu_device_is_sdpa(dtype, fresh_cache):
    # "meta" tensors (shapes without data) stand in for a device without a verified fused kernel.
    assert resolve_backend("auto", torch.device("meta"), dtype).name == "sdpa"
    q, k, v, w, b, g, grid = make_gpsa_inputs(2, 3, 12, 8, (3, 4), dtype=dtype)
    out = ck.gpsa_attention(*(t.to("meta") for t in (q, k, v, w, b, g)), grid)
    assert out.device.type == "meta" and out.shape == q.shape and out.dtype == dtype


def test_auto_on_a_gpu_without_trusted_kernels_is_sdpa(monkeypatch, fresh_cache):
    """A new user's GPU machine, simulated: SDPA's probe says yes for 'cuda', the fused kernels are not
    opted in. auto picks sdpa for every device type except cpu, where the fused cpu kernel stays first."""
    monkeypatch.delenv("CONVIT_KERNELS_TRUST_TRITON", raising=False)
    monkeypatch.delenv("CONVIT_KERNELS_ENABLE_CUDA", raising=False)
    sdpa = backends._REGISTRY["sdpa"]
    monkeypatch.setitem(backends._REGISTRY, "sdpa", dataclasses.replace(sdpa, probe=lambda dev: (True, "")))
    for dev in ("cuda", "mps", "xpu"):
        assert resolve_backend("auto", torch.device(dev), torch.bfloat16).name == "sdpa", dev
        report = ck.backend_report(dev, torch.bfloat16)
        assert report["sdpa"].startswith("chosen by auto"), report
        assert "auto prefers 'sdpa'" in report["reference"], report
    if ck.backend_status("cpu")["cpu"] == "available":
        assert resolve_backend("auto", torch.device("cpu"), torch.float32).name == "cpu"
        assert "auto prefers 'cpu' (rank 10 > 5)" in ck.backend_report("cpu")["sdpa"]
    # The opt-ins keep ranking above sdpa where they run.
    monkeypatch.setenv("CONVIT_KERNELS_TRUST_TRITON", "1")
    if "triton" in backends._REGISTRY:
        assert backends._REGISTRY["triton"].auto_rank("cuda") > sdpa.auto_rank("cuda")


def test_sdpa_is_the_cpu_fallback_without_the_extension(monkeypatch, fresh_cache):
    """Where the C++ extension is missing, auto on CPU takes sdpa (rank 5) rather than the reference (0)."""
    monkeypatch.delitem(backends._REGISTRY, "cpu", raising=False)
    assert resolve_backend("auto", torch.device("cpu"), torch.float32).name == "sdpa"


def test_resolution_is_cached_and_probes_only_the_named_backend(monkeypatch, fresh_cache):
    calls = []

    def counting(name):
        backend = backends._REGISTRY[name]

        def probe(dev):
            calls.append(name)
            return backend.probe(dev)
        monkeypatch.setitem(backends._REGISTRY, name, dataclasses.replace(backend, probe=probe))

    for name in list(backends._REGISTRY):
        counting(name)
    clear_backend_cache()
    q, k, v, w, b, g, grid = make_gpsa_inputs(1, 2, 4, 4, (2, 2))
    for _ in range(3):
        ck.gpsa_attention(q, k, v, w, b, g, grid, backend="sdpa")
    assert calls == ["sdpa"], f"expected one probe of sdpa only, got {calls}"
    ck.gpsa_attention(q.double(), k.double(), v.double(), w.double(), b.double(), g.double(), grid, backend="sdpa")
    assert calls == ["sdpa", "sdpa"], "a new dtype resolves once more"
    clear_backend_cache()
    ck.gpsa_attention(q, k, v, w, b, g, grid, backend="sdpa")
    assert calls == ["sdpa"] * 3, "clear_backend_cache makes the next call probe again"


def test_env_var_is_read_on_first_resolution_only(monkeypatch, fresh_cache):
    """What the docs promise: a probe's environment variable counts when the backend is first resolved;
    clear_backend_cache() makes a change in a running process take effect."""
    sdpa = backends._REGISTRY["sdpa"]

    def probe(dev):
        import os
        if os.environ.get("CONVIT_TEST_SDPA_OFF") == "1":
            return False, "switched off by CONVIT_TEST_SDPA_OFF=1"
        return sdpa.probe(dev)

    monkeypatch.setitem(backends._REGISTRY, "sdpa", dataclasses.replace(sdpa, probe=probe))
    clear_backend_cache()
    assert resolve_backend("sdpa", torch.device("cpu"), torch.float32).name == "sdpa"
    monkeypatch.setenv("CONVIT_TEST_SDPA_OFF", "1")
    assert resolve_backend("sdpa", torch.device("cpu"), torch.float32).name == "sdpa"  # cached
    clear_backend_cache()
    with pytest.raises(ValueError, match="switched off by CONVIT_TEST_SDPA_OFF=1"):
        resolve_backend("sdpa", torch.device("cpu"), torch.float32)
