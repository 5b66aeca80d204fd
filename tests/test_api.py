"""The public entry point: validation of every argument, and the backend registry."""
import pytest
import torch

import convit_kernels as ck
from convit_kernels.backends import resolve_backend
from convit_kernels.testing import make_gpsa_inputs


def _inputs(**kw):
    q, k, v, w, b, g, grid = make_gpsa_inputs(2, 3, 12, 8, (3, 4))
    args = dict(q=q, k=k, v=v, pos_weight=w, pos_bias=b, gating=g, grid_size=grid)
    args.update(kw)
    return args


def test_available_backends_always_has_reference():
    for dev in ("cpu", "cuda", torch.device("cpu")):
        assert "reference" in ck.available_backends(dev)
    status = ck.backend_status("cpu")
    assert set(status) >= {"reference", "cpu", "cuda", "triton", "sdpa"}
    assert status["reference"] == "available"
    assert status["sdpa"] == "available"  # SDPA runs wherever torch does
    assert status["cuda"] != "available"  # never on CPU tensors
    assert all(isinstance(v, str) and v for v in status.values())


def test_auto_matches_reference_on_cpu():
    args = _inputs()
    expected = ck.gpsa_attention(**args, backend="reference")
    torch.testing.assert_close(ck.gpsa_attention(**args, backend="auto"), expected, atol=1e-5, rtol=1e-5)


def test_strided_inputs_accepted():
    q, k, v, w, b, g, grid = make_gpsa_inputs(2, 3, 12, 8, (3, 4), layout="bnhd")
    assert not q.is_contiguous()
    out = ck.gpsa_attention(q, k, v, w, b, g, grid, backend="reference")
    expected = ck.gpsa_attention(q.contiguous(), k.contiguous(), v.contiguous(), w, b, g, grid, backend="reference")
    torch.testing.assert_close(out, expected)


BAD = [
    (dict(q=torch.randn(2, 12, 8)), ValueError, "q must have shape"),
    (dict(k=torch.randn(2, 3, 11, 8)), ValueError, "k must have the shape of q"),
    (dict(v=torch.randn(2, 3, 12, 8, dtype=torch.float64)), TypeError, "v must have the dtype of q"),
    (dict(q=torch.randint(0, 3, (2, 3, 12, 8))), TypeError, "q must be a floating-point"),
    (dict(pos_weight=torch.randn(3, 2)), ValueError, "pos_weight must have shape"),
    (dict(pos_bias=torch.randn(4)), ValueError, "pos_bias must have shape"),
    (dict(gating=torch.randn(3, 1)), ValueError, "gating must have shape"),
    (dict(gating=[1.0, 1.0, 1.0]), TypeError, "gating must be a torch.Tensor"),
    (dict(grid_size=(3, 3)), ValueError, "rows \\* cols == N"),
    (dict(grid_size=12), TypeError, "grid_size must be a \\(rows, cols\\)"),
    (dict(grid_size=(3.0, 4.0)), TypeError, "grid_size must be"),
    (dict(q=torch.randn(2, 3, 12, 8).transpose(-1, -2).contiguous().transpose(-1, -2)), ValueError,
     "q must have a contiguous last dimension"),
    (dict(pos_weight=torch.randn(3, 3, device="meta")), ValueError, "pos_weight must be on the device of q"),
    (dict(backend="fast"), ValueError, "backend must be 'auto' or one of"),
    (dict(backend=3), TypeError, "backend must be a str"),
    (dict(backend="cuda"), ValueError, "backend='cuda' is not available for cpu tensors"),
    (dict(scale="big"), TypeError, "scale must be a float"),
    (dict(scale=float("nan")), ValueError, "scale must be finite"),
]


@pytest.mark.parametrize("override,exc,match", BAD, ids=[m for _, _, m in BAD])
def test_bad_input_is_named(override, exc, match):
    args = _inputs(**override)
    with pytest.raises(exc, match=match):
        ck.gpsa_attention(**args)


def test_import_survives_missing_backends():
    status = ck.backend_status("cpu")
    for name in ("cpu", "triton"):
        if status[name] != "available":
            assert name not in ck.available_backends("cpu")
            with pytest.raises(ValueError, match=f"backend='{name}' is not available"):
                ck.gpsa_attention(**_inputs(backend=name))


def test_required_backends_are_available():
    """CI names the backends it builds (CONVIT_TEST_REQUIRE=cpu,triton), so a broken extension or
    kernel module fails the run instead of turning every test of that backend into a skip."""
    import os

    required = [name for name in os.environ.get("CONVIT_TEST_REQUIRE", "").split(",") if name]
    if not required:
        pytest.skip("CONVIT_TEST_REQUIRE is not set (CI sets it)")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    status = ck.backend_status(device)
    missing = {name: status.get(name, "unknown backend") for name in required if status.get(name) != "available"}
    assert not missing, f"required backends unavailable on {device}: {missing}"


@pytest.mark.parametrize("device,exc,match", [
    ("tpu", ValueError, "device must be a torch.device or a str such as 'cpu'.*got 'tpu'"),
    ("cuda:x", ValueError, "device must be .*got 'cuda:x'"),
    (3, TypeError, "device must be a torch.device or a str .*got int"),
])
def test_bad_device_is_named(device, exc, match):
    for fn in (ck.backend_status, ck.available_backends, ck.backend_report):
        with pytest.raises(exc, match=match):
            fn(device)


def test_backend_report_says_why():
    report = ck.backend_report("cpu")
    assert set(report) == set(ck.backend_status("cpu"))
    chosen = [name for name, why in report.items() if why.startswith("chosen by auto")]
    assert len(chosen) == 1, report
    assert chosen[0] == resolve_backend("auto", torch.device("cpu"), torch.float32).name
    assert report["cuda"].startswith("unavailable: does not run on 'cpu' tensors"), report
    for name, why in report.items():
        assert why, name
    with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
        ck.backend_report("cpu", "float32")


def test_clear_backend_cache_is_public():
    first = resolve_backend("reference", torch.device("cpu"), torch.float32)
    ck.clear_backend_cache()
    assert resolve_backend("reference", torch.device("cpu"), torch.float32) is first
