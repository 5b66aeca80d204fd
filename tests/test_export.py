"""Nothing lost by swapping: FX, TorchScript, torch.export, ONNX and meta tensors on fused GPSA.

Each path is checked against eager outputs on our ConViT (``convit.create_model``) and, where timm
is importable (CI's torch 2.14 environment), on timm's ConViT after ``convit.swap_gpsa``:

- ``torch.fx.symbolic_trace`` and torchvision's ``create_feature_extractor`` (GPSA's kernel call is
  an FX leaf, ``convit.models.gpsa_call``);
- ``torch.jit.script``, saved and loaded again (so no Python fallback hides in it), and its error
  messages naming the argument;
- ``torch.export.export`` with a dynamic batch (the backends' ops stay in the graph);
- ``torch.onnx.export(dynamo=True)`` run by onnxruntime at two batch sizes (skipped where onnx,
  onnxscript or onnxruntime is missing; CI's torch 2.14 environment has them);
- ``meta`` tensors through every backend named explicitly (its ops' fake implementations).

timm's own model tests on swapped models run in CI (.ci/run: tests/timm_suite/).
"""
import io
import os

import pytest
import torch

import convit
import convit_kernels as ck
from convit_kernels.testing import make_gpsa_inputs
from convit.models import GPSA, gpsa_call

# The CPU backends the export paths must serve ("reference" is the oracle; "cpu" and "sdpa" are
# the fast ones). Triton runs on CPU only under its interpreter, where fake tensors break it.
BACKENDS = ("cpu", "sdpa", "reference")


def _need(backend):
    status = ck.backend_status("cpu").get(backend)
    if status != "available":
        pytest.skip(f"backend {backend!r} unavailable on cpu: {status}")


def _random_gpsa_params(model):
    """Trained-like GPSA parameters: gates and positional heads away from their init."""
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "gating_param"):
                m.gating_param.normal_(0.0, 1.0)
                m.pos_proj.bias.normal_(0.0, 1.0)
                m.pos_proj.weight.add_(0.1 * torch.randn_like(m.pos_proj.weight))
    return model


# Shallow models keep the suite cheap: 3 GPSA blocks, then the class token joins for the last one.
SHALLOW = dict(depth=4, local_up_to_layer=3)


def _our_model(backend, **kwargs):
    torch.manual_seed(0)
    kwargs = dict(SHALLOW, img_size=32, patch_size=8, **kwargs)
    model = convit.create_model("convit_tiny", gpsa_backend=backend, num_classes=10, **kwargs)
    return _random_gpsa_params(model).eval()


def _timm_model(backend, **kwargs):
    """timm's convit_tiny at 64 px (a 4 x 4 grid), swapped to ``backend``."""
    timm = pytest.importorskip("timm", reason="timm is not importable here (CI's torch 2.14 environment has it)")
    torch.manual_seed(0)
    model = timm.create_model("convit_tiny", pretrained=False, img_size=64, **kwargs)
    return convit.swap_gpsa(_random_gpsa_params(model), backend=backend).eval()


def _images(batch, size, seed=1):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _assert_close(got, want, rel, what):
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    assert err <= rel * scale, f"{what}: max error {err:.3e} > {rel:g} x scale {scale:.3e}"


def _fused_calls(graph_module):
    return [n for n in graph_module.graph.nodes if n.op == "call_function" and n.target is gpsa_call]


# ---- FX -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_fx_symbolic_trace_matches_eager(backend):
    """The whole model traces; each GPSA layer is one leaf call; train-mode tracing too (grads flow)."""
    _need(backend)
    model = _our_model(backend)
    images = _images(2, 32)
    traced = torch.fx.symbolic_trace(model)
    assert len(_fused_calls(traced)) == 3, "each of the 3 GPSA layers should be one gpsa_call node"
    with torch.no_grad():
        _assert_close(traced(images), model(images), 1e-6, f"fx traced logits ({backend})")
    traced.train()
    traced(images).sum().backward()
    missing = [n for n, p in traced.named_parameters() if p.grad is None]
    assert not missing, f"no gradient after tracing for {missing[:4]}"


def test_fx_traces_a_lone_gpsa_without_grid_size():
    """A GPSA built alone (no grid_size) works out its square grid inside the leaf call, at run time."""
    torch.manual_seed(0)
    layer = GPSA(32, num_heads=4, backend="cpu" if "cpu" in ck.available_backends("cpu") else "sdpa").eval()
    traced = torch.fx.symbolic_trace(layer)
    x = torch.randn(2, 36, 32)
    _assert_close(traced(x), layer(x), 1e-6, "traced lone GPSA")
    with pytest.raises(ValueError, match="not a square grid"):
        traced(torch.randn(2, 35, 32))


@pytest.mark.parametrize("backend", ["cpu", "sdpa"])
def test_torchvision_feature_extractor_on_swapped_timm(backend):
    pytest.importorskip("torchvision", reason="torchvision is not importable here (CI's torch 2.14 environment has it)")
    from torchvision.models.feature_extraction import create_feature_extractor

    _need(backend)
    model = _timm_model(backend)
    images = _images(2, 64)
    want = {}
    hook = model.blocks[5].register_forward_hook(lambda m, i, o: want.setdefault("blocks.5", o))
    with torch.no_grad():
        model(images)
    hook.remove()
    extractor = create_feature_extractor(model, return_nodes={"blocks.5": "feat"})
    with torch.no_grad():
        got = extractor(images)["feat"]
    _assert_close(got, want["blocks.5"], 1e-6, f"blocks.5 features ({backend})")


# ---- TorchScript --------------------------------------------------------------------------------

def _script_roundtrip(model):
    """torch.jit.script, then save and load: a saved module holds no Python function calls."""
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(model), buf)
    buf.seek(0)
    return torch.jit.load(buf)


@pytest.mark.parametrize("backend", BACKENDS + ("auto",))
def test_torchscript_of_our_model_matches_eager(backend):
    if backend != "auto":
        _need(backend)
    model = _our_model(backend)
    images = _images(3, 32)
    scripted = _script_roundtrip(model)
    with torch.no_grad():
        _assert_close(scripted(images), model(images), 1e-5, f"scripted logits ({backend})")


@pytest.mark.parametrize("backend", ["cpu", "sdpa"])
def test_torchscript_of_swapped_timm_matches_eager(backend):
    _need(backend)
    model = _timm_model(backend, **SHALLOW)
    images = _images(2, 64)
    scripted = _script_roundtrip(model)
    with torch.no_grad():
        _assert_close(scripted(images), model(images), 1e-5, f"scripted swapped timm logits ({backend})")


def test_torchscript_errors_name_the_argument():
    backend = "cpu" if "cpu" in ck.available_backends("cpu") else "sdpa"
    layer = torch.jit.script(GPSA(32, num_heads=4, backend=backend).eval())
    with pytest.raises(Exception, match="not a square grid: set its grid_size"):
        layer(torch.randn(1, 35, 32))
    model = torch.jit.script(_our_model(backend))
    with pytest.raises(Exception, match=r"expected images of shape \(B, C, 32, 32\)"):
        model(torch.randn(1, 3, 40, 40))

    def call(q: torch.Tensor, w: torch.Tensor, b: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        return ck.gpsa_attention(q, q, q, w, b, g, (3, 5), None, "sdpa")

    fn = torch.jit.script(call)
    q = torch.randn(1, 2, 16, 8)
    with pytest.raises(Exception, match=r"grid_size \(rows, cols\) must satisfy rows \* cols == N = 16"):
        fn(q, torch.randn(2, 3), torch.zeros(2), torch.zeros(2))
    with pytest.raises(Exception, match=r"pos_weight must have shape \(H, 3\)"):
        fn(torch.randn(1, 2, 15, 8), torch.randn(3, 3), torch.zeros(2), torch.zeros(2))


# ---- torch.export ---------------------------------------------------------------------------------

def _export_dynamic_batch(model, images):
    batch = torch.export.Dim("batch", min=1, max=64)
    return torch.export.export(model, (images,), dynamic_shapes=({0: batch},))


@pytest.mark.parametrize("backend", ["cpu", "sdpa"])
@pytest.mark.parametrize("source", ["ours", "timm"])
def test_torch_export_dynamic_batch(backend, source):
    """The backends' ops stay in the exported graph; batch 2 exports, batches 1 and 3 run."""
    _need(backend)
    model = _our_model(backend) if source == "ours" else _timm_model(backend, **SHALLOW)
    size = 32 if source == "ours" else 64
    ep = _export_dynamic_batch(model, _images(2, size))
    op = {"cpu": "convit_kernels.gpsa_fwd", "sdpa": "convit_kernels.gpsa_positional"}[backend]
    assert op in str(ep.graph), f"the exported graph should call {op}"
    for batch in (1, 3):
        images = _images(batch, size, seed=batch)
        with torch.no_grad():
            _assert_close(ep.module()(images), model(images), 1e-5, f"exported ({source}, {backend}), batch {batch}")


# ---- ONNX ---------------------------------------------------------------------------------------

def _onnx_runtime():
    for name in ("onnx", "onnxscript"):
        pytest.importorskip(name, reason=f"{name} is not importable here (CI's torch 2.14 environment has it)")
    return pytest.importorskip("onnxruntime", reason="onnxruntime is not importable here "
                                                     "(CI's torch 2.14 environment has it)")


@pytest.mark.parametrize("backend", ["cpu", "sdpa"])
@pytest.mark.parametrize("source", ["ours", "timm"])
def test_onnx_export_runs_in_onnxruntime(backend, source, tmp_path):
    """A plain torch.onnx.export(dynamo=True) call, no extra argument for our ops; dynamic batch."""
    ort = _onnx_runtime()
    _need(backend)
    model = _our_model(backend) if source == "ours" else _timm_model(backend, **SHALLOW)
    size = 32 if source == "ours" else 64
    path = str(tmp_path / "model.onnx")
    torch.onnx.export(model, (_images(2, size),), path, dynamo=True,
                      dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for batch in (1, 3):
        images = _images(batch, size, seed=10 + batch)
        with torch.no_grad():
            want = model(images)
        got = torch.from_numpy(session.run(None, {name: images.numpy()})[0])
        _assert_close(got, want, 1e-5, f"onnxruntime logits ({source}, {backend}), batch {batch}")
    # After the export the model runs its fused backend again.
    assert not torch.onnx.is_in_onnx_export()


# ---- meta tensors -------------------------------------------------------------------------------

def _skip_unless_registered(backend):
    """Skip only where the backend's module did not import (e.g. no C++ extension); a registered
    backend must run on meta tensors, whatever its device and probe say."""
    if backend not in ck.backends._REGISTRY:
        pytest.skip(f"backend {backend!r} is not registered here: {ck.backend_status('meta')[backend]}")


@pytest.mark.parametrize("backend", ck.backends.KNOWN_BACKENDS)
def test_every_named_backend_runs_on_meta_tensors(backend):
    _skip_unless_registered(backend)
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v, w, b, g, grid = (t.to("meta") if isinstance(t, torch.Tensor) else t
                                  for t in make_gpsa_inputs(2, 3, 12, 8, (3, 4), dtype=dtype))
        out = ck.gpsa_attention(q, k, v, w, b, g, grid, backend=backend)
        assert out.device.type == "meta" and out.shape == q.shape and out.dtype == dtype, (backend, out)


@pytest.mark.parametrize("backend", ["cpu", "sdpa", "cuda", "triton"])
def test_model_on_meta_device(backend):
    """Shape inference of a whole model built on the meta device, through the ops' fake impls."""
    _skip_unless_registered(backend)
    with torch.device("meta"):
        model = convit.create_model("convit_tiny", img_size=32, patch_size=8, num_classes=7, gpsa_backend=backend,
                                    **SHALLOW)
    logits = model(torch.empty(5, 3, 32, 32, device="meta"))
    assert logits.device.type == "meta" and logits.shape == (5, 7) and logits.dtype == torch.float32


def test_export_packages_are_there_where_ci_requires_them():
    """CI's torch 2.14 environment installs torchvision, onnx, onnxscript and onnxruntime: there the
    feature-extractor and ONNX tests must run, not skip."""
    if os.environ.get("CONVIT_TEST_REQUIRE_TIMM") != "1":
        pytest.skip("CONVIT_TEST_REQUIRE_TIMM is not set (CI's torch 2.14 environment sets it)")
    import onnx, onnxruntime, onnxscript, torchvision  # noqa: F401,E401
