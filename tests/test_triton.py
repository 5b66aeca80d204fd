"""The Triton GPSA kernels (backend "triton") against the reference, on CPU under TRITON_INTERPRET=1.

tests/conftest.py sets TRITON_INTERPRET=1 when no GPU is visible, before convit_kernels is imported.
The interpreter is slow and mishandles bf16 dots, so these cases use fp32/fp16 and tiny B, H;
tests/test_fused_gpu.py and tests/test_triton_gpu.py have the GPU list (bf16, large shapes, opcheck, torch.compile).
"""
import pytest
import torch

import convit_kernels as ck
from convit_kernels.backends import resolve_backend
from convit_kernels.testing import (
    assert_close, assert_within_reference_rule, make_gpsa_inputs, reference_errors,
)

pytest.importorskip("triton")  # only a missing Triton skips; a broken module of ours must fail
from convit_kernels import triton_ops  # noqa: E402
pytestmark = pytest.mark.skipif(
    "triton" not in ck.available_backends("cuda" if torch.cuda.is_available() else "cpu"),
    reason=f"backend 'triton' unavailable: {ck.backend_status('cpu')['triton']}")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("out", "grad_q", "grad_k", "grad_v", "grad_pos_weight", "grad_pos_bias", "grad_gating")

# (B, H, N, D, grid, dtype, layout, block_n, split_d); block_n > 0 forces the tiled online-softmax
# path; split_d runs the head dim as two power-of-two chunks (48 = 32 + 16) instead of one masked chunk.
CASES = [
    (1, 2, 7, 16, (1, 7), torch.float32, "bhnd", 0, False),       # odd N, one-row grid
    (2, 2, 50, 48, (5, 10), torch.float32, "bnhd", 0, True),      # 48 = 32 + 16, non-square, strided
    (1, 3, 12, 48, (4, 3), torch.float32, "bnhd", 0, False),      # 48 as a masked 64, tall grid
    (1, 2, 16, 64, (4, 4), torch.float32, "bhnd", 0, False),
    (1, 2, 12, 40, (3, 4), torch.float32, "bhnd", 0, True),       # 32 + 8 (second chunk masked)
    (1, 2, 12, 8, (3, 4), torch.float32, "bhnd", 0, False),       # D below the smallest dot size
    (1, 2, 1, 16, (1, 1), torch.float32, "bhnd", 0, False),       # a single token
    (1, 2, 50, 48, (10, 5), torch.float32, "bnhd", 16, True),     # tiled path, odd number of key blocks
    (1, 2, 37, 64, (1, 37), torch.float32, "bhnd", 16, False),    # tiled, prime N
    (1, 2, 50, 48, (5, 10), torch.float16, "bnhd", 0, True),
    (1, 2, 50, 48, (5, 10), torch.float16, "bnhd", 0, False),
    (1, 2, 7, 16, (7, 1), torch.float16, "bhnd", 0, False),
    (1, 2, 16, 64, (4, 4), torch.float16, "bnhd", 0, False),
    (1, 2, 50, 16, (5, 10), torch.float16, "bnhd", 32, False),    # tiled, fp16
]


def _ids(case):
    B, H, N, D, grid, dtype, layout, bn, split = case
    return (f"B{B}H{H}N{N}D{D}g{grid[0]}x{grid[1]}-{str(dtype)[6:]}-{layout}" + (f"-tiled{bn}" if bn else "")
            + ("-split" if split else ""))


def _run_triton(inputs, grad_out, block_n=0, split_d=False):
    *tensors, grid = inputs
    ts = [t.detach().requires_grad_(True) for t in tensors]
    out = triton_ops.gpsa_triton(*ts, grid, block_n=block_n, split_d=split_d)
    grads = torch.autograd.grad(out, ts, grad_out.to(out.dtype))
    return out, grads


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_forward_and_all_gradients_match_reference(case):
    B, H, N, D, grid, dtype, layout, block_n, split_d = case
    inputs = make_gpsa_inputs(B, H, N, D, grid, dtype=dtype, device=DEVICE, layout=layout)
    # Representable in ``dtype``: its rounding would otherwise be an error of the yardstick's inputs
    # (the kernel gets grad_out in q's dtype), not of the kernel.
    grad_out = torch.randn(B, H, N, D, device=DEVICE).to(dtype).float()
    out64, grads64, ref_err_out, ref_err_grads = reference_errors(inputs, dtype, grad_out)
    out, grads = _run_triton(inputs, grad_out, block_n, split_d)
    assert out.dtype == dtype and out.shape == (B, H, N, D)
    assert grads[4].abs().max().item() == 0.0, "pos_bias cancels: its gradient must be exactly zero"
    for i, (name, got, want) in enumerate(zip(NAMES, (out, *grads), (out64, *grads64))):
        if name == "grad_pos_bias":
            continue
        ref_err = ref_err_out if i == 0 else ref_err_grads[i - 1]
        assert_within_reference_rule(name, got, want, ref_err, dtype, gradient=i > 0)


def test_auto_path_is_tiled_beyond_256_keys(monkeypatch):
    from convit_kernels import triton_common
    fwd = triton_ops.triton_fwd
    assert fwd.choose_path(196, 0)[0] == "short"   # whole-row configs among the candidates
    assert fwd.choose_path(256, 0)[0] == "short"
    assert fwd.choose_path(257, 0)[0] == "long"
    assert fwd.choose_path(50, 16) == ("forced", dict(WHOLE_ROW=False, BLOCK_N=16))
    assert fwd.launch_mode(196, torch.float32)[0] == "long"  # fp32 runs tiled configs only
    # The automatic switch end to end (fp16: whole rows below the threshold), with the threshold
    # lowered so that the interpreter stays quick.
    monkeypatch.setattr(triton_common, "WHOLE_ROW_MAX_N", 32)
    assert fwd.choose_path(40, 0)[0] == "long" and fwd.launch_mode(40, torch.float16)[0] == "long"
    inputs = make_gpsa_inputs(1, 2, 40, 16, (5, 8), dtype=torch.float16, device=DEVICE)
    grad_out = torch.randn(1, 2, 40, 16, device=DEVICE).half().float()
    out, grads = _run_triton(inputs, grad_out)
    ref, ref_grads, ref_err_out, ref_err_grads = reference_errors(inputs, torch.float16, grad_out)
    for i, (name, got, want) in enumerate(zip(NAMES, (out, *grads), (ref, *ref_grads))):
        if name == "grad_pos_bias":
            continue
        ref_err = ref_err_out if i == 0 else ref_err_grads[i - 1]
        assert_within_reference_rule(name, got, want, ref_err, torch.float16, gradient=i > 0)


def test_strided_views_of_fused_projection_give_identical_results():
    """q, k, v as views of one (B, N, 3, H, D) tensor: same bits as contiguous copies."""
    B, H, N, D, grid = 2, 2, 12, 48, (3, 4)
    base = torch.randn(B, N, 3, H, D, device=DEVICE)
    _, _, _, w, b, g, _ = make_gpsa_inputs(B, H, N, D, grid, device=DEVICE)
    views = [base[:, :, i].transpose(1, 2) for i in range(3)]
    assert views[0].stride(-1) == 1 and not views[0].is_contiguous()
    grad_out = torch.randn(B, H, N, D, device=DEVICE)
    out_v, grads_v = _run_triton((*views, w, b, g, grid), grad_out)
    out_c, grads_c = _run_triton((*(x.contiguous() for x in views), w, b, g, grid), grad_out)
    assert torch.equal(out_v, out_c)
    for a, c in zip(grads_v, grads_c):
        assert torch.equal(a, c)


def test_output_layout_makes_head_merge_free():
    q, k, v, w, b, g, grid = make_gpsa_inputs(2, 3, 12, 16, (3, 4), device=DEVICE)
    out = ck.gpsa_attention(q, k, v, w, b, g, grid, backend="triton")
    assert out.shape == (2, 3, 12, 16)
    assert out.transpose(1, 2).is_contiguous()  # so .reshape(B, N, H * D) is a view


def test_backward_is_deterministic():
    inputs = make_gpsa_inputs(2, 2, 20, 48, (4, 5), device=DEVICE, layout="bnhd")
    grad_out = torch.randn(2, 2, 20, 48, device=DEVICE)
    out1, grads1 = _run_triton(inputs, grad_out)
    out2, grads2 = _run_triton(inputs, grad_out)
    assert torch.equal(out1, out2)
    for a, c in zip(grads1, grads2):
        assert torch.equal(a, c)


def test_backend_registration(monkeypatch):
    assert "triton" in ck.available_backends(DEVICE)
    # "auto" must not prefer triton on CPU, nor on CUDA until a GPU run has verified it.
    assert resolve_backend("auto", torch.device("cpu"), torch.float32).name != "triton"
    monkeypatch.delenv("CONVIT_KERNELS_TRUST_TRITON", raising=False)
    backend = ck.backends._REGISTRY["triton"]
    assert backend.auto_rank("cpu") is None and backend.auto_rank("cuda") is None
    monkeypatch.setenv("CONVIT_KERNELS_TRUST_TRITON", "1")
    assert backend.auto_rank("cuda") is not None and backend.auto_rank("cpu") is None
    assert torch.float64 not in backend.dtypes
    monkeypatch.setattr(triton_ops.triton_fwd, "INTERPRET", False)
    ok, reason = triton_ops._probe("cpu")
    assert not ok and "TRITON_INTERPRET=1" in reason


def test_bad_input_raises_clear_errors():
    q, k, v, w, b, g, grid = make_gpsa_inputs(1, 2, 12, 16, (3, 4), device=DEVICE)
    with pytest.raises(ValueError, match="does not support dtype torch.float64"):
        ck.gpsa_attention(q.double(), k.double(), v.double(), w.double(), b.double(), g.double(), grid,
                          backend="triton")
    with pytest.raises(ValueError, match="block_n must be 0"):
        triton_ops.gpsa_triton(q, k, v, w, b, g, grid, block_n=24)
    big = torch.randn(1, 2, 12, 136, device=DEVICE)
    with pytest.raises(ValueError, match="D <= 128"):
        ck.gpsa_attention(big, big, big, w, b, g, grid, backend="triton")


def test_swap_small_convit_to_triton_matches_reference():
    from convit import swap_gpsa
    from convit.models import ConViT

    torch.manual_seed(0)
    model = ConViT(img_size=(24, 32), patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5,
                   local_up_to_layer=2, gpsa_backend="reference").to(DEVICE)
    for m in model.modules():  # move the gates off their init so both branches matter
        if hasattr(m, "gating_param"):
            with torch.no_grad():
                m.gating_param.normal_()
    x = torch.randn(2, 3, 24, 32, device=DEVICE)

    def run():
        model.zero_grad()
        logits = model(x)
        logits.square().sum().backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_logits, ref_grads = run()
    swap_gpsa(model, backend="triton")
    assert model.gpsa_backend == "triton"
    logits, grads = run()
    # fp32 end to end through two blocks of LayerNorm/MLP: errors stay at the 1e-6 level of fp32
    # rounding; 1e-4 of the magnitude catches any wrong GPSA term.
    assert_close(logits, ref_logits, atol=1e-4 * max(1.0, ref_logits.abs().max().item()), name="logits")
    for n, gr in ref_grads.items():
        assert_close(grads[n], gr, atol=1e-4 * max(1.0, gr.abs().max().item()), name=f"grad {n}")


def _fake_bench_favouring_last(calls):
    """A stand-in for the autotuner's benchmarker: runs the config once (as the real one does, on the
    same buffers) and reports decreasing times, so the LAST config of the list wins."""
    def do_bench(kernel_call, quantiles=None):
        kernel_call()
        calls.append(1)
        t = 1000.0 - len(calls)
        return [t, t, t] if quantiles else t
    return do_bench


def _tuner_with(name, kernel, cfgs, key, estimate, do_bench):
    import triton
    from convit_kernels import triton_common
    return triton.autotune(configs=cfgs, key=key, do_bench=do_bench, prune_configs_by=dict(
        early_config_prune=triton_common.shared_memory_pruner(estimate, name)))(kernel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_real_autotuner_through_several_configs_gives_right_gradients(dtype, monkeypatch):
    """Triton's own Autotuner runs every config of a list on the same buffers, then the winner once
    more. The interpreter's lists have one config, so here each kernel gets three (BLOCK_M 16, 32,
    64) and a fake timer makes the largest BLOCK_M win: any buffer state a losing config leaves
    behind (e.g. partial-sum slots only a smaller BLOCK_M writes) would reach the gradients."""
    from convit_kernels import triton_bwd, triton_common, triton_fwd
    cfg = triton_common.cfg
    calls = []
    bench = _fake_bench_favouring_last(calls)
    ieee = dtype == torch.float32
    if ieee:  # fp32 runs tiled configs only
        mode, tiles = "long", [cfg(bm, 4, BLOCK_N=16) for bm in (16, 32, 64)]
    else:  # fp16 at N <= 256: whole-row and tiled configs in one list, as on a GPU
        mode = "short"
        tiles = [cfg(16, 4, WHOLE_ROW=True, BLOCK_N=16), cfg(32, 4, WHOLE_ROW=True, BLOCK_N=16),
                 cfg(64, 4, WHOLE_ROW=False, BLOCK_N=16)]
    fwd = _tuner_with("fwd", triton_fwd._gpsa_fwd_kernel, tiles, ["N", "HEAD_DIM"], triton_fwd.fwd_shared_memory,
                      bench)
    dq = _tuner_with("dq", triton_bwd._gpsa_bwd_dq_kernel, tiles, ["N", "HEAD_DIM"], triton_bwd.dq_shared_memory,
                     bench)
    dkv = _tuner_with("dkv", triton_bwd._gpsa_bwd_dkv_kernel, [cfg(bm, 4, BLOCK_N=bm) for bm in (16, 32, 64)],
                      ["N", "HEAD_DIM"], triton_bwd.dkv_shared_memory, bench)
    monkeypatch.setitem(triton_fwd._FWD_TUNERS, (mode, ieee), fwd)
    monkeypatch.setitem(triton_bwd._DQ_TUNERS, (mode, ieee), dq)
    monkeypatch.setitem(triton_bwd._DKV_TUNERS, ieee, dkv)

    B, H, N, D = 2, 2, 50, 16  # N = 50: 4 query blocks of 16, 1 of 64
    inputs = make_gpsa_inputs(B, H, N, D, (5, 10), dtype=dtype, device=DEVICE, layout="bnhd")
    grad_out = torch.randn(B, H, N, D, device=DEVICE).to(dtype).float()
    out64, grads64, ref_err_out, ref_err_grads = reference_errors(inputs, dtype, grad_out)
    out, grads = _run_triton(inputs, grad_out)
    assert len(calls) == 9, "each of the three kernels must have timed all three of its configs"
    for tuner in (fwd, dq, dkv):
        assert tuner.best_config.kwargs["BLOCK_M"] == 64
    for i, (name, got, want) in enumerate(zip(NAMES, (out, *grads), (out64, *grads64))):
        if name == "grad_pos_bias":
            continue
        ref_err = ref_err_out if i == 0 else ref_err_grads[i - 1]
        assert_within_reference_rule(name, got, want, ref_err, dtype, gradient=i > 0)
    # A second call hits the autotuner's cache (no timing) and must give the same bits.
    out2, grads2 = _run_triton(inputs, grad_out)
    assert len(calls) == 9
    assert torch.equal(out, out2) and all(torch.equal(a, c) for a, c in zip(grads, grads2))


def test_shared_memory_pruning_and_first_configs_fit():
    """The pruner drops configs over the limit and keeps the rest in order; every config of every
    GPU list binds, and every list's first config fits (by the estimate) at every supported size."""
    import inspect

    import triton
    from convit_kernels import triton_bwd, triton_common, triton_fwd
    big = [triton_common.cfg(16, 4, WHOLE_ROW=True, BLOCK_N=16), triton_common.cfg(256, 8, WHOLE_ROW=True, BLOCK_N=16)]
    prune = triton_common.shared_memory_pruner(triton_bwd.dq_shared_memory, "dq")
    meta = dict(HEAD_DIM=128, D0=128, D1=0, ROW_N=256, IEEE=True)
    # fp32, D = 128, whole rows of 256: K and V alone are 2 x 128 KB, over the 227 KB of an sm_90 block
    with pytest.raises(ValueError, match="no autotune config fits"):
        prune(big, {}, **meta)
    assert prune(big, {}, **dict(meta, IEEE=False)) == big[:1]  # bf16: 16 rows fit, 256 do not
    # With the autotuner off each list's first config runs alone, unpruned: it must fit everywhere.
    for N in (1, 16, 50, 196, 256, 257, 577, 4096):
        for D in (1, 16, 48, 80, 128):
            for dtype in ("fp32", "bf16"):
                for split_d in (False, True):
                    for block_n in (0, 16, triton_common.MAX_FORCED_BLOCK_N):
                        plan = (triton_fwd.kernel_plan(N, D, dtype, block_n, split_d)
                                + triton_bwd.kernel_plan(N, D, dtype, block_n, split_d))
                        for name, tuner, ce, gpu_configs in plan:
                            # Every config binds: launch constexprs + config kwargs name each
                            # constexpr exactly once (a missing one is a TypeError on a GPU, a
                            # repeated one the autotuner's "Conflicting meta-parameters").
                            params = inspect.signature(tuner.fn.fn).parameters.items()
                            needed = {n for n, p in params if "constexpr" in str(p.annotation)}
                            for c in gpu_configs:
                                assert not set(ce) & set(c.kwargs), (name, c, ce)
                                assert set(ce) | set(c.kwargs) == needed, (name, c, ce)
                            first = gpu_configs[0]
                            est = tuner.early_config_prune.estimate(dict(ce, **first.kwargs), first.num_stages)
                            assert est <= triton_common.SM90_SHARED_MEMORY, (name, N, D, dtype, split_d, block_n)
    assert triton.next_power_of_2(197) == triton_common.next_pow2(197) == 256


def test_index_range_is_checked_before_launch():
    """B * H * N * D past 2**31 is fine (int64 batch/head offsets); one slice past int32 is refused."""
    from convit_kernels import triton_common
    big = torch.empty(0, device="meta").as_strided((64, 64, 1024, 128), (64 * 1024 * 128, 1024 * 128, 128, 1))
    triton_common.check_index_range(1024, 128, 64, 64, dict(q=big))  # 2**29 * 1 elements: fine
    huge = torch.empty(0, device="meta").as_strided((1, 2, 2**20, 128), (2**29, 128, 2**12, 1))
    with pytest.raises(ValueError, match="q: one .batch, head. slice spans"):
        triton_common.check_index_range(2**20, 128, 1, 2, dict(q=huge))


_SYMBOLIC_TRACE = r'''
import torch
import torch.fx
from torch.fx.experimental.proxy_tensor import make_fx
import convit_kernels  # noqa: F401 - registers the ops
from convit_kernels import triton_fwd
from convit_kernels.testing import make_gpsa_inputs

assert not triton_fwd.INTERPRET  # real JITFunctions: what torch.compile sees on a GPU
GRIDS = {50: (5, 10), 196: (14, 14), 577: (1, 577)}

def step(block_n, split_d, rows, cols):
    def f(q, k, v, w, b, g):
        out, lse = torch.ops.convit_kernels.gpsa_fwd_triton(q, k, v, w, g, rows, cols, 0.125, block_n, split_d)
        return out, lse, torch.ops.convit_kernels.gpsa_bwd_triton(out, q, k, v, w, g, lse, rows, cols, 0.125,
                                                                   block_n, split_d)
    return f

for N, D, dtype, block_n, split_d in [(196, 48, torch.bfloat16, 0, False), (196, 48, torch.float32, 0, True),
                                      (577, 80, torch.bfloat16, 0, True), (50, 64, torch.float16, 16, False)]:
    q, k, v, w, b, g, grid = make_gpsa_inputs(2, 3, N, D, GRIDS[N], dtype=dtype, layout="bnhd")
    # Every size a SymInt: the fake implementations run the launchers (no kernel is launched).
    gm = make_fx(step(block_n, split_d, *grid), tracing_mode="symbolic")(q, k, v, w, b, g)
    out = [n for n in gm.graph.nodes if n.op == "output"][0].args[0][0].meta["val"]
    assert any(isinstance(s, torch.SymInt) for s in out.shape), out.shape
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert {"convit_kernels.gpsa_fwd_triton.default", "convit_kernels.gpsa_bwd_triton.default"} <= targets, targets

# torch.compile(dynamic=True): aot_dispatch_dynamic decomposes the triton_ops into
# triton_kernel_wrapper_functional nodes whose grids and int arguments are SymInts. The captured
# graph is never run (no GPU): the backend stops after tracing.
from torch._dynamo.backends.common import aot_autograd

class Traced(Exception):
    pass

graphs = []
def capture(gm, example_inputs):
    graphs.append(gm)
    def stop(*args):
        raise Traced
    return stop

for N, D, dtype, split_d in [(196, 48, torch.bfloat16, True), (577, 128, torch.float32, False)]:
    q, k, v, w, b, g, grid = make_gpsa_inputs(2, 3, N, D, GRIDS[N], dtype=dtype, layout="bnhd")
    fwd = step(0, split_d, *grid)
    compiled = torch.compile(lambda *a: fwd(*a)[0], backend=aot_autograd(fw_compiler=capture), dynamic=True,
                             fullgraph=True)
    try:
        compiled(q, k, v, w, b, g)
    except Traced:
        pass
    gm = graphs[-1]
    wrappers = [n for n in gm.graph.nodes if "triton_kernel_wrapper" in str(n.target)]
    assert len(wrappers) >= 4, gm.code  # pos stats + forward + pos stats + dq + dkv
    # N and the grids stay symbolic (graph nodes), not constants specialized to this call
    assert all(isinstance(n.kwargs["kwargs"]["N"], torch.fx.Node) for n in wrappers), gm.code
    assert all(any(isinstance(x, torch.fx.Node) for x in n.kwargs["grid"][0]) for n in wrappers), gm.code
print("traced")
'''


def test_launchers_trace_with_symbolic_shapes():
    """make_fx(tracing_mode="symbolic") of both registered ops, and torch.compile(dynamic=True) down
    to aot_dispatch_dynamic's graph of triton_kernel_wrapper nodes: the launchers get SymInts and
    must choose paths, chunk widths and constexprs from them. Nothing is launched (the compile
    backend stops after tracing). In a subprocess without TRITON_INTERPRET, as on a GPU; what needs
    a GPU (Triton's mutation analysis, inductor's launch) is tests/test_triton_gpu.py's."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _SYMBOLIC_TRACE], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0 and "traced" in run.stdout, run.stderr[-3000:]


_SM90_COMPILE = r'''
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from convit_kernels import triton_bwd as B, triton_common as C, triton_fwd as F

FP32_ARGS = {"LSE", "POS_LSE2", "W", "G", "DELTA", "PART"}

def signature(fn, dtype, constexprs):
    missing = [fn.arg_names[i] for i in fn.constexprs if fn.arg_names[i] not in constexprs]
    assert not missing, (fn.__name__, missing)  # a launch without them fails to bind
    return {n: "constexpr" if n in constexprs else
            ("*fp32" if n in FP32_ARGS else "*" + dtype) if n.isupper() and n not in ("H", "N") else
            "fp32" if n == "scale" else "i32" for n in fn.arg_names}

cases = json.loads(sys.argv[1])
shard, shards = map(int, sys.argv[2].split("/"))
jobs = {}
for N, D, dtype, block_n, split_d in cases:
    for name, tuner, ce, gpu_configs in F.kernel_plan(N, D, dtype, block_n, split_d) + B.kernel_plan(
            N, D, dtype, block_n, split_d):
        first = gpu_configs[0]  # what CONVIT_KERNELS_TRITON_AUTOTUNE=0 runs, unpruned
        meta = dict(ce, **first.kwargs)
        key = (name, dtype, tuple(sorted(meta.items())), first.num_warps, first.num_stages)
        jobs.setdefault(key, (tuner.fn, meta, first, tuner.early_config_prune.estimate, (N, D, block_n, split_d)))
failures = []
mine = list(jobs.items())[shard::shards]  # the shards together compile every job once
for (name, dtype, _, warps, stages), (fn, meta, first, estimate, case) in mine:
    src = ASTSource(fn=fn, signature=signature(fn, dtype, meta), constexprs=meta)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    shared = kernel.metadata.shared
    where = f"{name} {dtype} (N, D, block_n, split_d) = {case} {first}"
    if shared > C.SM90_SHARED_MEMORY:
        failures.append(f"{where}: {shared} B of shared memory, over sm_90's 227 KB")
    if shared > estimate(meta, stages):
        failures.append(f"{where}: {shared} B > the pruning estimate {estimate(meta, stages)}")
    # the batch / head offsets are 64-bit (B * H * N * D may pass 2**31)
    if not kernel.asm["cubin"] or "arith.extsi" not in kernel.asm["ttir"]:
        failures.append(f"{where}: no cubin or no 64-bit offsets")
assert not failures, "\n".join(failures)
print(f"compiled {len(mine)} of {len(jobs)}")
'''


def _gpu_test_cases():
    """(N, D, dtype, block_n, split_d) of every Triton launch the GPU tests make: tests/test_fused_gpu.py
    (shared with the cuda backend) and tests/test_triton_gpu.py (forced tiles, split head dims)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).with_name("test_fused_gpu.py")
    spec = importlib.util.spec_from_file_location("_fused_gpu_shapes", path)
    gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu)
    cases = {(N, D, dt, 0, False) for N, D in gpu.SHAPES for dt in ("fp32", "bf16", "fp16")}
    cases |= {(N, 32, "fp32", 0, False) for N in (50, 577)}  # contiguous (B, H, N, D) inputs
    cases |= {(577, 64, "fp16", 0, False), (50, 48, "fp32", 0, False), (300, 48, "bf16", 0, False)}  # races, opcheck
    cases |= {(N, D, dt, bn, False) for N, D, bn in ((196, 48, 32), (50, 64, 16)) for dt in ("fp32", "bf16")}
    cases |= {(N, D, dt, 0, True) for N, D in ((196, 48), (197, 80), (577, 48)) for dt in ("fp32", "bf16")}
    assert (196, 48) in gpu.SHAPES and (577, 128) in gpu.SHAPES  # keep in step with the GPU files
    return sorted(cases)


def test_first_configs_compile_for_sm90_within_limits():
    """With CONVIT_KERNELS_TRITON_AUTOTUNE=0 each kernel runs its list's first config, unpruned.
    Lower every one the GPU tests launch (fp32, bf16, fp16; forced tiles; split head dims) to sm_90
    cubin with Triton's bundled ptxas (no GPU needed) and check it fits in 227 KB of shared memory
    and within the pruning estimate. The interpreter never compiles: this catches GPU-only lowering
    errors and over-large configs in CI.

    The ~80 compiles (single-threaded, ~2 CPU minutes on a cold Triton cache, which is what CI has)
    are dealt round-robin to one process per core, at most 4: each compiles every n-th job, and
    together they must have compiled all of them.
    """
    import json
    import os
    import re
    import subprocess
    import sys

    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this triton has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CONVIT_KERNELS_TRITON_AUTOTUNE"] = "0"
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    shards = max(1, min(4, cores))
    cases = json.dumps(_gpu_test_cases())
    procs = [subprocess.Popen([sys.executable, "-c", _SM90_COMPILE, cases, f"{i}/{shards}"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(shards)]
    try:
        results = [proc.communicate(timeout=3000) for proc in procs]
    finally:
        for proc in procs:  # none outlives the test (a timeout, an interrupt)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    done, total = 0, set()
    for i, (proc, (out, err)) in enumerate(zip(procs, results)):
        assert proc.returncode == 0, f"shard {i}/{shards}:\n{err[-3000:]}"
        m = re.search(r"compiled (\d+) of (\d+)", out)
        assert m, f"shard {i}/{shards} printed no count:\n{out[-1000:]}\n{err[-2000:]}"
        done += int(m.group(1))
        total.add(int(m.group(2)))
    assert len(total) == 1 and done == total.pop() > 0, (done, total)
