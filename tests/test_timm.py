"""Against the real peer: timm's ConViT (``timm.models.convit``).

Skipped, with the reason, where timm is not importable (it needs torchvision, which the CPU build
of torch 2.13 that the README installs has no wheel for); CI's second environment (torch 2.14.1 +
torchvision + timm, see .ci/run) runs them.

- ``swap_gpsa`` on timm's convit_tiny keeps its logits and every parameter gradient, in eval and
  train mode, for each GPSA backend that runs on the CPU;
- our ConViT and timm's load each other's state dicts strictly and give the same logits;
- ``torch.compile(fullgraph=True)`` of the swapped timm model matches eager;
- on a GPU (marker ``gpu``): the same swap on timm's convit_small for every GPU backend.
"""
import copy

import pytest
import torch

import convit
import convit_kernels as ck

timm = pytest.importorskip("timm", reason="timm is not importable here (it needs torchvision); "
                                          "CI's torch 2.14 environment installs it")

CPU_BACKENDS = ("reference", "cpu", "sdpa")
GPU_BACKENDS = ("sdpa", "triton", "cuda")


def _timm_model(name, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs)
    # Random, not freshly initialised, GPSA parameters: the gates and positional heads of a trained
    # model are away from their init (gating 1, a zero bias), and a zero is no test.
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "gating_param"):
                m.gating_param.normal_(0.0, 1.0)
                m.pos_proj.bias.normal_(0.0, 1.0)
                m.pos_proj.weight.add_(0.1 * torch.randn_like(m.pos_proj.weight))
    return model


def _skip_unless_available(backend, device):
    status = ck.backend_status(device).get(backend, f"backend {backend!r} is not known to this build")
    if status != "available":
        pytest.skip(f"backend {backend!r} unavailable on {device}: {status}")


def _logits_and_grads(model, images):
    model.zero_grad(set_to_none=True)
    logits = model(images)
    # A fixed random direction, so every parameter's gradient is exercised (not only the argmax's).
    direction = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1)).to(logits)
    (logits * direction).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def _gpsa_count(model):
    return sum(type(m).__name__ == "GPSA" and type(m).__module__.startswith("convit") for m in model.modules())


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_swap_gpsa_keeps_timm_logits_and_gradients(backend, mode):
    """fp32: logits within 1e-5 of their scale, gradients within 1e-4 of each tensor's scale.

    Measured with timm 1.0.31: 7e-7 (logits) and 4e-6 (gradients) relative, for the C++ kernel. The
    bounds leave ~15-25x for other summation orders (sdpa, BLAS threads); a wrong term errs by O(1).
    pos_proj.bias: its true gradient is 0 (the bias cancels in the softmax). timm's eager autograd
    gives rounding noise there, so it is compared in absolute terms against the pos_proj.weight
    gradient's scale.
    """
    _skip_unless_available(backend, "cpu")
    theirs = _timm_model("convit_tiny")
    ours = convit.swap_gpsa(copy.deepcopy(theirs), backend=backend)
    assert _gpsa_count(ours) == 10, "swap_gpsa should replace timm's 10 GPSA layers"
    for m in (theirs, ours):
        m.train(mode == "train")
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    want_logits, want_grads = _logits_and_grads(theirs, images)
    got_logits, got_grads = _logits_and_grads(ours, images)

    scale = want_logits.abs().max().item()
    err = (got_logits - want_logits).abs().max().item()
    assert err <= 1e-5 * scale, f"logits differ by {err:.3e} (scale {scale:.3e}), backend={backend}, {mode}"
    assert set(got_grads) == set(want_grads), "the swapped model must have the same parameters with gradients"
    for name, want in want_grads.items():
        got = got_grads[name]
        if name.endswith("pos_proj.bias"):
            weight_scale = want_grads[name.replace(".bias", ".weight")].abs().max().item()
            for who, g in (("ours", got), ("timm", want)):
                assert g.abs().max().item() <= 1e-5 * weight_scale, (
                    f"{name} ({who}): gradient {g.abs().max().item():.3e} should be ~0 "
                    f"(pos_proj.weight's scale {weight_scale:.3e})")
            continue
        g_scale = max(want.abs().max().item(), 1e-12)
        g_err = (got - want).abs().max().item()
        assert g_err <= 1e-4 * g_scale, (
            f"grad {name}: max error {g_err:.3e} > 1e-4 x scale {g_scale:.3e} (backend={backend}, {mode})")


def test_state_dicts_load_both_ways_with_the_same_logits():
    theirs = _timm_model("convit_tiny").eval()
    ours = convit.create_model("convit_tiny", gpsa_backend="reference").eval()
    assert set(ours.state_dict()) == set(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = theirs(images)
        got = ours(images)
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()

    back = timm.create_model("convit_tiny", pretrained=False).eval()
    torch.manual_seed(4)
    fresh = convit.create_model("convit_tiny").eval()
    back.load_state_dict(fresh.state_dict(), strict=True)
    with torch.no_grad():
        want, got = back(images), fresh(images)
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_compiled_swapped_timm_model_matches_eager():
    """``torch.compile(fullgraph=True)`` traces through our GPSA op (fake impl + autograd) in timm's model."""
    backend = "cpu" if "cpu" in ck.available_backends("cpu") else "reference"
    model = convit.swap_gpsa(_timm_model("convit_tiny", img_size=64), backend=backend).eval()
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model(images)
        got = torch.compile(model, fullgraph=True, dynamic=False)(images)
    err = (got - want).abs().max().item()
    assert err <= 1e-5 * want.abs().max().item(), f"compiled logits differ by {err:.3e} (backend={backend})"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_swap_gpsa_on_timm_convit_small_cuda(backend):
    """On a GPU, fp32 math off (bf16 autocast as in training): logits within 2x the error that
    timm's own eager model makes in bf16, both against timm's fp32 logits."""
    _skip_unless_available(backend, "cuda")
    theirs = _timm_model("convit_small").cuda().eval()
    ours = convit.swap_gpsa(copy.deepcopy(theirs), backend=backend).eval()
    images = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(6)).cuda()
    with torch.no_grad():
        want = theirs(images).float()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            timm_bf16 = theirs(images).float()
            got = ours(images).float()
    timm_err = (timm_bf16 - want).abs().max().item()
    err = (got - want).abs().max().item()
    assert err <= 2 * timm_err + 1e-3 * want.abs().max().item(), (
        f"backend={backend}: bf16 logits err {err:.3e}; timm's own bf16 err {timm_err:.3e}")
