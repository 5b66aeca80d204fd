"""Helpers shared by the tests and the benchmarks: random GPSA inputs and error reports."""
from __future__ import annotations

import contextlib

import torch

from .reference import gpsa_reference

__all__ = ["make_gpsa_inputs", "max_error", "assert_close", "reference_errors", "assert_within_reference_rule",
           "GRAD_NAMES", "no_tf32", "output_and_grads", "check_against_reference", "assert_compiled_matches_eager",
           "gradcheck_backend"]

# Names of a GPSA call's output and its six gradients, in argument order.
GRAD_NAMES = ("out", "grad_q", "grad_k", "grad_v", "grad_pos_weight", "grad_pos_bias", "grad_gating")


def make_gpsa_inputs(B, H, N, D, grid_size=None, dtype=torch.float32, device="cpu", requires_grad=False,
                     layout="bhnd", generator=None):
    """Fresh random GPSA inputs (never zeros): ``(q, k, v, pos_weight, pos_bias, gating, grid_size)``.

    ``layout="bnhd"`` returns q, k, v as (B, H, N, D) views of (B, N, H, D) storage (what the
    model's projections give: strided, last dim contiguous). pos_weight mimics a trained GPSA
    (a local head with a random centre and strength plus noise) so both softmaxes matter.
    """
    if grid_size is None:
        side = int(round(N ** 0.5))
        grid_size = (side, side) if side * side == N else (1, N)
    g = generator

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(device=device)

    if layout == "bhnd":
        q, k, v = (rnd(B, H, N, D).to(dtype) for _ in range(3))
    elif layout == "bnhd":
        q, k, v = (rnd(B, N, H, D).to(dtype).transpose(1, 2) for _ in range(3))
    else:
        raise ValueError(f"layout must be 'bhnd' or 'bnhd'; got {layout!r}")
    alpha = 0.2 + rnd(H).abs()
    centre = 2 * rnd(H, 2)
    pos_weight = torch.stack([2 * alpha * centre[:, 0], 2 * alpha * centre[:, 1], -alpha], dim=1) + 0.1 * rnd(H, 3)
    pos_bias = rnd(H)
    gating = rnd(H)
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    params = [t.to(pdtype) for t in (pos_weight, pos_bias, gating)]
    tensors = [q, k, v] + params
    if requires_grad:
        tensors = [t.detach().requires_grad_(True) for t in tensors]
    return (*tensors, tuple(grid_size))


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item() if actual.numel() else 0.0


def assert_close(actual, expected, atol, rtol=0.0, name="tensor"):
    """Like torch.testing.assert_close, with a message giving max error, where, and the tolerance."""
    a, e = actual.double(), expected.double()
    if a.shape != e.shape:
        raise AssertionError(f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    err = (a - e).abs()
    bound = atol + rtol * e.abs()
    bad = ~(err <= bound)
    if bad.any():
        idx = tuple(int(i) for i in torch.nonzero(bad)[0])
        worst = tuple(int(i) for i in torch.nonzero(err == err.max())[0]) if err.numel() else ()
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{err.numel()} elements out of tolerance (atol={atol:g}, rtol={rtol:g}); "
            f"max abs error {err.max().item():.3e} at {worst}; first failure at {idx}: "
            f"got {a[idx].item():.6g}, expected {e[idx].item():.6g}")


def reference_errors(inputs, low_dtype, grad_out=None):
    """Errors of the reference run in ``low_dtype`` against the float64 reference.

    ``inputs``: (q, k, v, pos_weight, pos_bias, gating, grid_size) in any dtype. Returns
    ``(ref64_out, ref64_grads, low_err_out, low_err_grads)``: the float64 output and six gradients
    (for ``grad_out``, random if None) and the max errors of the same computation done by the
    reference in ``low_dtype`` (q, k, v in ``low_dtype``, parameters in float32). This is the yard
    stick of the low-precision rule: a fused kernel may err at most a small multiple of it.
    """
    *tensors, grid = inputs

    def run(dtype, pdtype):
        ts = [t.detach().to(dtype if i < 3 else pdtype).requires_grad_(True) for i, t in enumerate(tensors)]
        out = gpsa_reference(*ts, grid)
        grads = torch.autograd.grad(out, ts, grad_out.to(out.dtype), allow_unused=True)
        return out, [g if g is not None else torch.zeros_like(t) for g, t in zip(grads, ts)]

    if grad_out is None:
        g = torch.Generator().manual_seed(0)
        grad_out = torch.randn(tensors[0].shape, generator=g).to(tensors[0].device)
    out64, grads64 = run(torch.float64, torch.float64)
    out_lo, grads_lo = run(low_dtype, torch.float32)
    return out64, grads64, max_error(out_lo, out64), [max_error(a, b) for a, b in zip(grads_lo, grads64)]


def assert_within_reference_rule(name, got, want, ref_err, dtype, gradient, context=""):
    """The project's tolerance for a fused kernel's result ``got`` against the float64 reference ``want``.

    ``ref_err``: the error of the reference run in ``dtype`` (from ``reference_errors``).
    - float16 / bfloat16, docs/DESIGN.md section 4: at most 2x (output) / 3x (gradients) ``ref_err``, plus a hair
      (1e-6) of fp32 noise and one unit roundoff of ``dtype`` at the largest entry (2^-9 of it in bf16, 2^-12 in fp16). The
      reference's error is one random draw, and for a result of a few numbers (grad_gating: one per
      head) it can by chance sit far below the dtype's resolution: without that floor the sdpa backend's
      bf16 grad_gating failed 2 of 60 fresh draws (worst 1.24x the ratio alone), with it the worst of
      80 draws is 0.77x. A wrong term errs by O(1) of the largest entry, far above the floor.
    - float32: fp32 errs from rounding of long sums (~1e-6 of the largest entry) and from the
      conditioning of the positional logits (|w . r| reaches 10^2, so exp arguments carry ~|z| 2^-24
      absolute error), which dominates grad_pos_weight (a sum of dZ * r with r up to rows^2 + cols^2,
      heavy cancellation). The reference run in fp32 suffers the same conditioning, so 10x (output)
      / 20x (gradients) its error (exp2, other summation orders; the worst of 100 Triton draws reached
      0.62 of it) plus 2e-5 of the largest entry bounds a kernel, while a wrong term errs by O(1) of
      that entry. TF32 dots (10-bit mantissa) err near 1e-3 of it and fail.
    """
    if dtype == torch.float32:
        allowed = (20.0 if gradient else 10.0) * ref_err + 2e-5 * max(1.0, want.abs().max().item())
        assert_close(got, want, atol=allowed, name=name)
    elif dtype in (torch.float16, torch.bfloat16):
        unit_roundoff = torch.finfo(dtype).eps / 2
        allowed = (3.0 if gradient else 2.0) * ref_err + unit_roundoff * want.abs().max().item() + 1e-6
        err = max_error(got, want)
        assert err <= allowed, f"{name}: max error {err:.3e} > allowed {allowed:.3e} ({dtype}{context})"
    else:
        raise ValueError(f"dtype must be float32, float16 or bfloat16; got {dtype}")


@contextlib.contextmanager
def no_tf32():
    """CUDA matmuls in true fp32 (no TF32) inside the block: the fp32 rule needs IEEE products."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def output_and_grads(fn, inputs, grad_out):
    """``[out, grad_q, grad_k, grad_v, grad_pos_weight, grad_pos_bias, grad_gating]`` of
    ``fn(q, k, v, pos_weight, pos_bias, gating, grid_size)`` on fresh leaves of ``inputs``."""
    *tensors, grid = inputs
    ts = [t.detach().requires_grad_(True) for t in tensors]
    out = fn(*ts, grid)
    return [out] + list(torch.autograd.grad(out, ts, grad_out.to(out.dtype)))


def check_against_reference(fn, B, H, N, D, dtype, grid_size, layout="bnhd", device="cuda"):
    """A fused GPSA ``fn`` against the float64 reference by the project's rule, output and all gradients.

    ``fn(q, k, v, pos_weight, pos_bias, gating, grid_size) -> out``. Also checks what every fused
    backend promises: out in q's dtype, laid out as (B, N, H, D), and pos_bias's gradient exactly 0.
    """
    inputs = make_gpsa_inputs(B, H, N, D, grid_size, dtype=dtype, device=device, layout=layout)
    # Representable in dtype, so its rounding is not counted as the kernel's error.
    grad_out = torch.randn(B, H, N, D, device=device).to(dtype).float()
    with no_tf32():
        out64, grads64, ref_err_out, ref_err_grads = reference_errors(inputs, dtype, grad_out)
        results = output_and_grads(fn, inputs, grad_out)
    out = results[0]
    assert out.dtype == dtype and out.shape == (B, H, N, D), (out.dtype, tuple(out.shape))
    assert out.transpose(1, 2).is_contiguous(), "out must be laid out as (B, N, H, D)"
    assert results[5].abs().max().item() == 0.0, "grad of pos_bias must be exactly zero"
    for i, (name, got, want) in enumerate(zip(GRAD_NAMES, results, (out64, *grads64))):
        if name == "grad_pos_bias":
            continue
        ref_err = ref_err_out if i == 0 else ref_err_grads[i - 1]
        assert_within_reference_rule(name, got, want, ref_err, dtype, gradient=i > 0, context=f", N={N}, D={D}")


def assert_compiled_matches_eager(backend, atol, rtol, device="cpu"):
    """``torch.compile(fullgraph=True)`` of a function calling ``gpsa_attention(backend=...)`` gives
    the eager output and all six gradients within ``atol + rtol |eager|`` (the same op runs in
    both; inductor regenerates only the surrounding elementwise code)."""
    from .api import gpsa_attention

    torch.compiler.reset()
    q, k, v, w, b, g, grid = make_gpsa_inputs(2, 3, 20, 16, (4, 5), requires_grad=True, layout="bnhd",
                                              device=device)

    def f(q, k, v, w, b, g):
        return gpsa_attention(q, k, v, w, b, g, grid, backend=backend) * 2.0

    go = torch.randn(2, 3, 20, 16, device=device)
    ts = (q, k, v, w, b, g)
    out_c = torch.compile(f, fullgraph=True)(*ts)
    grads_c = torch.autograd.grad(out_c, ts, go)
    out_e = f(*ts)
    grads_e = torch.autograd.grad(out_e, ts, go)
    for name, a, e in zip(GRAD_NAMES, (out_c,) + grads_c, (out_e,) + grads_e):
        assert_close(a, e, atol=atol, rtol=rtol, name=f"compiled {name} ({backend})")
    torch.compiler.reset()


def gradcheck_backend(backend, B, H, N, D, grid_size):
    """``torch.autograd.gradcheck`` of ``gpsa_attention(backend=...)`` in float64, all six inputs
    (strided q, k, v as the model gives them); returns its verdict."""
    from .api import gpsa_attention

    q, k, v, w, b, g, grid = make_gpsa_inputs(B, H, N, D, grid_size, dtype=torch.float64, requires_grad=True,
                                              layout="bnhd")

    def f(q, k, v, w, b, g):
        return gpsa_attention(q, k, v, w, b, g, grid, backend=backend)

    return torch.autograd.gradcheck(f, (q, k, v, w, b, g), eps=1e-6, atol=1e-8, rtol=1e-6)
