"""What only the Triton backend has, on a GPU: forced tiled path, split head dims, the autotuner on
its real config lists, torch.compile with dynamic shapes, its opt-in for ``auto``.

The properties every fused backend shares (precision by the reference rule, sizes, determinism,
races, opcheck, torch.compile, the ConViT model) are tests/test_fused_gpu.py, for both backends.

Every test is marked ``gpu`` (skipped by tests/conftest.py where CUDA is absent). The CPU
interpreter tests in tests/test_triton.py cover the same math at tiny sizes; these add bf16,
realistic N and D, the real autotuner and what the interpreter cannot run (``torch.compile``).
"""
import pytest
import torch

import convit_kernels as ck
from convit_kernels.testing import assert_close, check_against_reference, make_gpsa_inputs

GRIDS = {50: (5, 10), 196: (14, 14), 197: (1, 197), 577: (1, 577), 576: (24, 24)}


def _check_against_reference(B, H, N, D, dtype, layout="bnhd", block_n=0, split_d=False):
    from convit_kernels import triton_ops

    def fn(q, k, v, w, b, g, grid):
        return triton_ops.gpsa_triton(q, k, v, w, b, g, grid, block_n=block_n, split_d=split_d)
    check_against_reference(fn, B, H, N, D, dtype, GRIDS[N], layout=layout)


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
def test_auto_does_not_prefer_triton_unverified(monkeypatch):
    from convit_kernels.backends import resolve_backend

    assert "triton" in ck.available_backends("cuda")
    monkeypatch.delenv("CONVIT_KERNELS_TRUST_TRITON", raising=False)
    ck.clear_backend_cache()
    assert resolve_backend("auto", torch.device("cuda"), torch.bfloat16).name != "triton"
    monkeypatch.setenv("CONVIT_KERNELS_TRUST_TRITON", "1")
    ck.clear_backend_cache()
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
