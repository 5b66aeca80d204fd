"""The Triton GPSA kernels (backend "triton") against the reference, on CPU under TRITON_INTERPRET=1.

tests/conftest.py sets TRITON_INTERPRET=1 when no GPU is visible, before convit_kernels is imported.
The interpreter is slow and mishandles bf16 dots, so these cases use fp32/fp16 and tiny B, H;
tests/test_triton_gpu.py has the GPU list (bf16, large shapes, opcheck, torch.compile).
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
    fwd = triton_ops.triton_fwd
    assert fwd.choose_path(196, 0)[0] == "short"   # whole-row configs among the candidates
    assert fwd.choose_path(256, 0)[0] == "short"
    assert fwd.choose_path(257, 0)[0] == "long"
    assert fwd.choose_path(50, 16) == ("forced", dict(WHOLE_ROW=False, BLOCK_N=16))
    # The automatic switch end to end, with the threshold lowered so that the interpreter stays quick.
    monkeypatch.setattr(fwd, "WHOLE_ROW_MAX_N", 32)
    assert fwd.choose_path(40, 0)[0] == "long"
    inputs = make_gpsa_inputs(1, 2, 40, 16, (5, 8), device=DEVICE)
    grad_out = torch.randn(1, 2, 40, 16, device=DEVICE)
    out, grads = _run_triton(inputs, grad_out)
    ref, ref_grads, ref_err_out, ref_err_grads = reference_errors(inputs, torch.float32, grad_out)
    for i, (name, got, want) in enumerate(zip(NAMES, (out, *grads), (ref, *ref_grads))):
        ref_err = ref_err_out if i == 0 else ref_err_grads[i - 1]
        assert_within_reference_rule(name, got, want, ref_err, torch.float32, gradient=i > 0)


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


_SM90_COMPILE = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from convit_kernels import triton_bwd as B, triton_fwd as F

def signature(fn, ptrs, constexprs):
    return {n: "constexpr" if n in constexprs else ptrs.get(n, "fp32" if n == "scale" else "i32")
            for n in fn.arg_names}

p, f = "*bf16", "*fp32"
d0, d1 = F.head_dim_split(48)
fwd = dict(Q=p, K=p, V=p, OUT=p, LSE=f, POS_LSE2=f, W=f, G=f)
dq = dict(Q=p, K=p, V=p, DO=p, LSE=f, POS_LSE2=f, W=f, G=f, DQ=p, DELTA=f, PART=f)
dkv = dict(Q=p, K=p, V=p, DO=p, LSE=f, POS_LSE2=f, DELTA=f, W=f, G=f, DK=p, DV=p)
common = dict(HEAD_DIM=48, D0=d0, D1=d1, IEEE=False)
jobs = [
    (F._gpsa_fwd_kernel, fwd, dict(common, ROW_N=256, BLOCK_M=16, BLOCK_N=16, WHOLE_ROW=True), 4),
    (F._gpsa_fwd_kernel, fwd, dict(common, ROW_N=256, BLOCK_M=64, BLOCK_N=64, WHOLE_ROW=False), 8),
    (B._gpsa_bwd_dq_kernel, dq, dict(common, ROW_N=256, BLOCK_M=16, BLOCK_N=16, WHOLE_ROW=True), 8),
    (B._gpsa_bwd_dkv_kernel, dkv, dict(common, BLOCK_M=32, BLOCK_N=64), 4),
]
for fn, ptrs, constexprs, warps in jobs:
    src = ASTSource(fn=fn, signature=signature(fn, ptrs, constexprs), constexprs=constexprs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=2))
    assert kernel.asm["cubin"], fn.__name__
print("compiled")
'''


def test_kernels_compile_for_sm90_without_a_gpu():
    """Lower the main bf16 kernels to sm_90 cubin (Triton's bundled ptxas; no GPU needed).

    The interpreter never compiles, so this is what catches GPU-only lowering errors in CI.
    """
    import os
    import subprocess
    import sys

    import triton

    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")):
        pytest.skip("this triton has no bundled ptxas")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    run = subprocess.run([sys.executable, "-c", _SM90_COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-3000:]
