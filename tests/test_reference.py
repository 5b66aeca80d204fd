"""The reference GPSA against the equations, written here independently, in float64."""
import itertools
import math

import pytest
import torch

import convit_kernels as ck
from convit_kernels.reference import relative_indices
from convit_kernels.testing import assert_close, make_gpsa_inputs


def gpsa_from_equations(q, k, v, w, b, g, grid, scale):
    """GPSA by explicit loops over heads and query/key patches (docs/DESIGN.md section 1)."""
    B, H, N, D = q.shape
    rows, cols = grid
    out = torch.zeros_like(q)
    for h in range(H):
        pos = torch.empty(N, N, dtype=q.dtype)
        for i, j in itertools.product(range(N), range(N)):
            dx = (j % cols) - (i % cols)
            dy = (j // cols) - (i // cols)
            pos[i, j] = w[h, 0] * dx + w[h, 1] * dy + w[h, 2] * (dx * dx + dy * dy) + b[h]
        p_pos = torch.exp(pos - pos.max(-1, keepdim=True).values)
        p_pos = p_pos / p_pos.sum(-1, keepdim=True)
        s = 1.0 / (1.0 + math.exp(-g[h].item()))
        for bi in range(B):
            logits = (q[bi, h] @ k[bi, h].T) * scale
            p_c = torch.exp(logits - logits.max(-1, keepdim=True).values)
            p_c = p_c / p_c.sum(-1, keepdim=True)
            out[bi, h] = ((1 - s) * p_c + s * p_pos) @ v[bi, h]
    return out


@pytest.mark.parametrize("B,H,N,D,grid", [(2, 4, 9, 8, (3, 3)), (1, 3, 12, 16, (3, 4)), (2, 2, 15, 5, (5, 3)),
                                          (1, 1, 7, 4, (1, 7))])
def test_reference_matches_equations(B, H, N, D, grid):
    q, k, v, w, b, g, grid = make_gpsa_inputs(B, H, N, D, grid, dtype=torch.float64)
    scale = 0.7 * D ** -0.5
    expected = gpsa_from_equations(q, k, v, w, b, g, grid, scale)
    assert_close(ck.gpsa_reference(q, k, v, w, b, g, grid, scale), expected, atol=1e-12, name="reference")
    # Default scale is D ** -0.5; the public entry point agrees.
    expected = gpsa_from_equations(q, k, v, w, b, g, grid, D ** -0.5)
    assert_close(ck.gpsa_attention(q, k, v, w, b, g, grid, backend="reference"), expected, atol=1e-12, name="api")


def test_relative_indices_match_official_square_construction():
    """The official get_rel_indices, transcribed, equals ours on a square grid."""
    s = 5
    ind = torch.arange(s).view(1, -1) - torch.arange(s).view(-1, 1)
    indx = ind.repeat(s, s)
    indy = ind.repeat_interleave(s, dim=0).repeat_interleave(s, dim=1)
    official = torch.stack([indx, indy, indx ** 2 + indy ** 2], dim=-1).float()
    assert torch.equal(ck.relative_indices(s, s), official)


def test_composed_baseline_equals_reference():
    q, k, v, w, b, g, grid = make_gpsa_inputs(2, 3, 20, 8, (4, 5), dtype=torch.float64)
    assert_close(ck.gpsa_composed(q, k, v, w, b, g, grid), ck.gpsa_reference(q, k, v, w, b, g, grid),
                 atol=1e-12, name="composed")


@pytest.mark.parametrize("grid", [(3, 3), (2, 5)])
def test_reference_gradcheck_float64(grid):
    N = grid[0] * grid[1]
    inputs = make_gpsa_inputs(2, 2, N, 4, grid, dtype=torch.float64, requires_grad=True)
    *tensors, grid = inputs
    assert torch.autograd.gradcheck(lambda *t: ck.gpsa_attention(*t, grid, backend="reference"), tensors)


def test_pos_bias_gradient_vanishes():
    *tensors, grid = make_gpsa_inputs(2, 3, 16, 8, dtype=torch.float64, requires_grad=True)
    out = ck.gpsa_attention(*tensors, grid, backend="reference")
    grads = torch.autograd.grad(out, tensors, torch.randn_like(out))
    assert grads[4].abs().max() < 1e-12
    assert all(gr.abs().max() > 0 for i, gr in enumerate(grads) if i != 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_low_precision_dtypes(dtype):
    *tensors, grid = make_gpsa_inputs(2, 4, 16, 8, dtype=dtype, requires_grad=True)
    out = ck.gpsa_attention(*tensors, grid, backend="reference")
    assert out.dtype == dtype and out.shape == (2, 4, 16, 8)
    out.float().sum().backward()
    for t in tensors:
        assert t.grad is not None and t.grad.dtype == t.dtype and torch.isfinite(t.grad).all()
    exact = ck.gpsa_reference(*[t.detach().double() for t in tensors], grid)
    # The reference in low precision is conditioning-limited: a logit z is rounded to |z| eps, which
    # moves its probability by that much relative, so the output errs ~ eps (1 + max |z|) max |v|.
    # Over 400 fresh draws per dtype the ratio of the error to that scale peaked at 0.09 (bf16),
    # 0.11 (fp16) and 0.18 (fp32); 0.5 leaves room, while a wrong term errs by O(max |v|).
    # (A fixed atol of 0.06 for bf16 failed 7 of 300 draws: the positional logits reach ~50.)
    eps = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}[dtype]
    d = [t.detach().double() for t in tensors]
    pos_logits = (relative_indices(*grid, dtype=torch.float64) @ d[3].t()).abs().max().item()
    content_logits = (d[0] @ d[1].transpose(-2, -1)).abs().max().item() * d[0].shape[-1] ** -0.5
    tol = 0.5 * eps * (1.0 + max(pos_logits, content_logits)) * d[2].abs().max().item()
    assert_close(out.detach(), exact, atol=tol, name=f"reference in {dtype}")
