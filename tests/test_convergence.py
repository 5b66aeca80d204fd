"""Convergence: a tiny ConViT trained on the digits with each CPU backend follows the reference's loss curve.

Kernel tests compare one call with the reference; this one checks what a user sees after many: a
small ConViT (scikit-learn's 8x8 digits as the training default loads them, 2x2 patches, two GPSA
blocks then two plain ones) is trained for STEPS AdamW steps from the same initialisation on the same
batches, once per backend, and its per-step training loss must follow the curve of
``backend="reference"``. Backends that are not available here are skipped with the reason.

Tolerance. Every backend computes the same function in float32, only with the rounding of another
order of operations, and training carries such differences from step to step. How far is measured,
not guessed: the reference is also trained in float64, and the float32 reference's largest per-step
distance from that curve (``drift``, about 1e-5 here) is what float32 rounding alone does to this
run. A backend may differ from the float32 reference by at most ``DRIFT_FACTOR * drift +
LOSS_FLOOR``: a few times the rounding drift (the two float32 curves can drift in opposite
directions, and another summation order is another draw of the same noise), plus 2e-5, about 100
float32 ulps of a loss near 2.3, for a run where the float32 reference happens to track float64
very closely. A wrong gradient moves the curve by far more: freezing pos_proj, gating_param or qk
(the effect of a zero gradient) moved it by 0.05 to 0.12 within these steps.

The learning rate (1e-3) keeps the run out of the chaotic regime: at 2e-3 and above, float32 and
float64 reference curves part by 1e-3 to 1e-1 once the loss leaves its plateau near ln 10, which
would make any comparison loose; ``test_reference_run_learns`` checks that the run learns and stays
stable. One intra-op thread: the ops are tiny, and on a loaded machine OpenMP threads waiting for
each other made a run 100 times slower.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import convit_kernels as ck
from convit.data import load_digits_split
from convit.models import ConViT

STEPS = 40
BATCH = 64
DRIFT_FACTOR = 8.0
LOSS_FLOOR = 2e-5
BACKENDS = ["cpu", "sdpa"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn", reason="the digits come from scikit-learn (the 'train' extra)")
    x, y, _, _ = load_digits_split()
    return (x - x.mean()) / x.std(), y


def _loss_curve(digits, backend: str, dtype=torch.float32) -> torch.Tensor:
    """The training loss of each of STEPS AdamW steps, (STEPS,) float64; same model and batches for every call."""
    x, y = digits
    torch.manual_seed(0)
    model = ConViT(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=32, depth=4, num_heads=4,
                   mlp_ratio=2.0, local_up_to_layer=2, gpsa_backend=backend).to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    batches = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(STEPS):
        idx = torch.randint(0, len(y), (BATCH,), generator=batches)
        loss = F.cross_entropy(model(x[idx].to(dtype)), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64)


@pytest.fixture(scope="module")
def reference_curves(digits):
    """(float32 reference curve, float64 reference curve, ref_drift)."""
    ref32 = _loss_curve(digits, "reference")
    ref64 = _loss_curve(digits, "reference", torch.float64)
    return ref32, ref64, (ref32 - ref64).abs().max().item()


def test_reference_run_learns(reference_curves):
    # The comparison means something only if the run trains (the loss falls from chance) and stays stable.
    ref32, ref64, drift = reference_curves
    assert ref32[:3].mean() > 2.2, ref32  # chance: ln 10 ~ 2.30
    assert ref32[-5:].mean() < ref32[:3].mean() - 0.08, ref32
    assert drift < 1e-4, f"float32 and float64 reference curves differ by {drift:.2e}: the run is too chaotic to compare"


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_curve_matches_reference(digits, reference_curves, backend):
    status = ck.backend_status("cpu")
    if backend not in ck.available_backends("cpu"):
        pytest.skip(f"backend {backend!r} is not available on the CPU: {status.get(backend, 'not registered')}")
    ref32, _, drift = reference_curves
    curve = _loss_curve(digits, backend)
    gap = (curve - ref32).abs()
    tol = DRIFT_FACTOR * drift + LOSS_FLOOR
    step = int(gap.argmax())
    assert gap.max().item() <= tol, (
        f"backend {backend!r}: loss differs from the reference by {gap.max().item():.3e} at step {step} "
        f"({curve[step].item():.6f} vs {ref32[step].item():.6f}); tolerance {tol:.3e} = {DRIFT_FACTOR} x "
        f"float32-vs-float64 reference drift {drift:.3e} + {LOSS_FLOOR}")
