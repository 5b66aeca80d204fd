"""Triton forward kernels of GPSA and their launchers.

Layout and math follow DESIGN.md section 1. One forward call runs two kernels:

- ``_gpsa_pos_stats_kernel``: the log-sum-exp of the positional logits of every (head, query),
  (H, N) float32. The positional softmax does not depend on the batch, so this is done once per
  call and costs H x N x N exponentials, nothing next to the attention itself.
- ``_gpsa_fwd_kernel``: one program = BLOCK_M queries of one (batch, head). Positional logits are
  formed in registers from the row/col indices of the patch grid; nothing of size N x N is read.
  Whole-row path (``WHOLE_ROW``, a candidate for N <= 256): the program holds the full rows of
  scores, takes the exact content softmax, mixes it with the exact positional probabilities and
  does ONE matmul with V. Tiled path: online softmax for the content branch over key blocks, the
  positional branch (exact thanks to the precomputed statistics) accumulated beside it, mixed at
  the end. For N <= 256 the autotuner picks between the two per (N, D, dtype).

The head dimension runs as one power-of-two chunk with the columns past D masked (never read or
written), or, with ``split_d``, as two power-of-two chunks D0 + D1 (48 = 32 + 16, 80 = 64 + 16)
with no padded column at all; see ``head_dim_split`` for why the first is the default.
Accumulation is float32; fp32 inputs use IEEE dots (no TF32).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["gpsa_fwd_launch", "pos_stats_launch", "head_dim_split", "INTERPRET", "WHOLE_ROW_MAX_N"]

# Read once: triton.jit decides at decoration time whether kernels run under the interpreter.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The whole-row path holds BLOCK_M x next_pow2(N) scores in registers; beyond 256 keys it would spill.
WHOLE_ROW_MAX_N = 256
MAX_HEAD_DIM = 128
# CONVIT_KERNELS_TRITON_AUTOTUNE=0 (read at import): each kernel runs its first config untimed,
# which saves the compile-and-time of the whole set per (N, D, dtype), e.g. for quick test runs.
AUTOTUNE = os.environ.get("CONVIT_KERNELS_TRITON_AUTOTUNE", "1") != "0"


def head_dim_split(D: int, split: bool = False) -> tuple[int, int]:
    """(D0, D1): the head-dim chunk widths the kernels use for head dim D (D1 == 0: one chunk).

    ``split=False`` (the default): one chunk of next_pow2(D) columns (at least 16, the smallest
    ``tl.dot`` size), the columns past D masked: they are never read from or written to memory,
    only the matmuls run on zeros (D = 48: 64-wide dots). ``split=True``: D0 is the largest power
    of two <= D and D1 the rest rounded up to a power of two >= 16, so 48 = 32 + 16 and
    80 = 64 + 16 with no padded column at all. Compiled for sm_90 (Triton 3.9, bf16, N = 196),
    the split whole-row kernels spill registers (hundreds of bytes to KBs of stack per thread)
    while the single-chunk ones do not, hence the default; a GPU benchmark should settle it.
    """
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"the triton backend supports head dims 1..{MAX_HEAD_DIM}; got D = {D}")
    if not split:
        return max(16, triton.next_power_of_2(D)), 0
    d0 = max(16, 1 << (D.bit_length() - 1))
    rest = D - d0
    d1 = 0 if rest <= 0 else max(16, triton.next_power_of_2(rest))
    return d0, d1


def _configs(gpu_configs, interpret_config):
    # One config under the interpreter: its autotuner then runs the kernel once instead of timing it.
    if INTERPRET:
        return [interpret_config]
    return gpu_configs if AUTOTUNE else gpu_configs[:1]


def _cfg(block_m, warps, stages=1, **extra):
    return triton.Config(dict(BLOCK_M=block_m, **extra), num_warps=warps, num_stages=stages)


# --------------------------------------------------------------------------------------------
# Helpers shared with the backward (triton_bwd imports them).


@triton.jit
def _load_rows(base, offs_r, stride_r, offs_d, n_rows, HEAD_DIM: tl.constexpr):
    """A (len(offs_r), len(offs_d)) tile of a row-major (rows, HEAD_DIM) matrix, zero-padded."""
    mask = (offs_r[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM)
    return tl.load(base + offs_r[:, None] * stride_r + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _store_rows(base, val, offs_r, stride_r, offs_d, n_rows, HEAD_DIM: tl.constexpr):
    mask = (offs_r[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM)
    tl.store(base + offs_r[:, None] * stride_r + offs_d[None, :], val, mask=mask)


# The kernels use exp2, with logits carried in log2 units (natural units times log2 e).
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _coords(offs, cols):
    """(row, col) of the row-major patches ``offs``, as float32 vectors."""
    r = offs // cols
    return r.to(tl.float32), (offs - r * cols).to(tl.float32)


@triton.jit
def _rel_offsets(offs_q, offs_k, cols):
    """dx, dy (float32, [query, key]) of keys ``offs_k`` seen from queries ``offs_q``.

    Per element one float subtraction each (exact: small integers); the divisions are per vector.
    """
    rq, cq = _coords(offs_q, cols)
    rk, ck = _coords(offs_k, cols)
    return ck[None, :] - cq[:, None], rk[None, :] - rq[:, None]


@triton.jit
def _rel_offsets_t(offs_k, offs_q, cols):
    """dx, dy (float32, [key, query]): the transpose of ``_rel_offsets(offs_q, offs_k)``."""
    rq, cq = _coords(offs_q, cols)
    rk, ck = _coords(offs_k, cols)
    return ck[:, None] - cq[None, :], rk[:, None] - rq[None, :]


@triton.jit
def _pos_weights_log2(W, h):
    """Head h's positional weights scaled by log2(e): the kernels exponentiate with exp2."""
    w0 = tl.load(W + h * 3 + 0) * LOG2E
    w1 = tl.load(W + h * 3 + 1) * LOG2E
    w2 = tl.load(W + h * 3 + 2) * LOG2E
    return w0, w1, w2


@triton.jit
def _program_tile(num_blocks, H):
    """This program's (block, bh, b, h): the grids list the blocks of one (batch, head) together."""
    pid = tl.program_id(0)
    bh = pid // num_blocks
    return pid % num_blocks, bh, bh // H, bh % H


@triton.jit
def _head_params(W, G, h, scale):
    """Head h's positional weights and content-logit scale, both in log2 units, and its gate sigmoid(g_h)."""
    w0, w1, w2 = _pos_weights_log2(W, h)
    return w0, w1, w2, scale * LOG2E, tl.sigmoid(tl.load(G + h).to(tl.float32))


@triton.jit
def _pos_arg(dx, dy, w0, w1, w2, lse2):
    """log2 of the positional probability: (w . r) log2(e) minus the row's log2-sum-exp2.

    ``w0, w1, w2`` pre-scaled by log2(e); ``lse2`` broadcast to the tile. Horner form
    dx (w0 + w2 dx) + dy (w1 + w2 dy): four FMAs and one subtraction per element.
    """
    return dx * (w0 + w2 * dx) + (dy * (w1 + w2 * dy) - lse2)


@triton.jit
def _scores(a0, a1, b0, b1, D1: tl.constexpr, IEEE: tl.constexpr):
    """a @ b^T over the two head-dim chunks, float32."""
    if IEEE:
        s = tl.dot(a0, tl.trans(b0), input_precision="ieee")
        if D1 > 0:
            s += tl.dot(a1, tl.trans(b1), input_precision="ieee")
    else:
        s = tl.dot(a0, tl.trans(b0))
        if D1 > 0:
            s += tl.dot(a1, tl.trans(b1))
    return s


@triton.jit
def _mm(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b (float32 accumulation)."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


# --------------------------------------------------------------------------------------------
# Positional statistics: once per call, shared by every batch element.


@triton.jit
def _gpsa_pos_stats_kernel(W, POS_LSE2, N, cols, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """POS_LSE2[h, i] = log2 sum_j 2^(log2(e) w_h . r_ij) for BLOCK_M queries i of head h.

    That is the log-sum-exp of the positional logits in log2 units (natural units times log2 e),
    the form the attention kernels consume. Grid: (cdiv(N, BLOCK_M), H). The bias b_h cancels in
    the softmax and is left out.
    """
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    w0, w1, w2 = _pos_weights_log2(W, h)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    zero = tl.zeros([BLOCK_M], tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        dx, dy = _rel_offsets(offs_m, offs_n, cols)
        z = _pos_arg(dx, dy, w0, w1, w2, zero[:, None])
        z = tl.where(offs_n[None, :] < N, z, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(z, 1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(z - m_new[:, None]), 1)
        m_i = m_new
    tl.store(POS_LSE2 + h * N + offs_m, m_i + tl.log2(l_i), mask=offs_m < N)


def pos_stats_launch(pos_weight: torch.Tensor, N: int, cols: int, wrap=lambda kernel: kernel) -> torch.Tensor:
    """(H, N) float32 positional log-sum-exp in log2 units (see the kernel); ``pos_weight`` (H, 3)
    float32 contiguous."""
    H = pos_weight.shape[0]
    pos_lse2 = torch.empty((H, N), device=pos_weight.device, dtype=torch.float32)
    block_m = 16 if INTERPRET else 64
    block_n = 16 if INTERPRET else 64
    wrap(_gpsa_pos_stats_kernel)[(triton.cdiv(N, block_m), H)](
        pos_weight, pos_lse2, N, cols, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
    return pos_lse2


# --------------------------------------------------------------------------------------------
# The forward kernel.

# Autotuning, keyed on (N, D) and, by Triton, the argument dtypes. For N <= WHOLE_ROW_MAX_N the
# candidates are whole-row configs AND tiled ones (a whole row is not always the fastest: where it
# spills registers, e.g. D = 128, a tiled config wins); beyond, tiled configs only; with a forced
# key block (block_n > 0), tiled configs without BLOCK_N. The sets keep configs that compile for
# sm_90 (bf16, D = 48, N = 196) with at most a few dozen bytes of register spill per thread
# (cuobjdump resource usage; e.g. whole-row BLOCK_M 32 x 4 warps and 64 x 8 warps spill 288 / 472
# bytes and were dropped).
_FWD_WHOLE = [_cfg(16, 4, WHOLE_ROW=True, BLOCK_N=16), _cfg(16, 8, WHOLE_ROW=True, BLOCK_N=16),
              _cfg(32, 8, WHOLE_ROW=True, BLOCK_N=16)]
_FWD_TILED = [_cfg(64, 8, 2, BLOCK_N=64), _cfg(32, 4, 2, BLOCK_N=64), _cfg(128, 8, 2, BLOCK_N=64)]
_FWD_SHORT_CONFIGS = _configs(_FWD_WHOLE + _FWD_TILED, _cfg(16, 4, WHOLE_ROW=True, BLOCK_N=16))
_FWD_LONG_CONFIGS = _configs(_FWD_TILED, _cfg(16, 4, BLOCK_N=32))
_FWD_FORCED_CONFIGS = _configs([_cfg(32, 4, 2), _cfg(64, 8, 2)], _cfg(16, 4))


@triton.jit
def _gpsa_fwd_kernel(
    Q, K, V, OUT, LSE, POS_LSE2, W, G,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    H, N, cols, scale,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    ROW_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WHOLE_ROW: tl.constexpr,
    IEEE: tl.constexpr,
):
    """GPSA output for BLOCK_M queries of one (batch, head).

    Grid: (cdiv(N, BLOCK_M) * B * H,), one axis so that B * H may pass CUDA's 65535 limit on the
    other axes; consecutive programs share a (batch, head) and so its K and V in L2.

    Writes OUT rows (in q's dtype, at OUT's strides) and LSE[b, h, i], the log-sum-exp of the
    scaled content logits (float32), which the backward uses to rebuild the content softmax.
    """
    pid_m, bh, b, h = _program_tile(tl.cdiv(N, BLOCK_M), H)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    o_base = OUT + b * stride_ob + h * stride_oh
    w0, w1, w2, qk_scale, gate = _head_params(W, G, h, scale)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d0 = tl.arange(0, D0)
    offs_d1 = D0 + tl.arange(0, D1 if D1 > 0 else 16)
    q0 = _load_rows(q_base, offs_m, stride_qn, offs_d0, N, HEAD_DIM)
    q1 = q0
    if D1 > 0:
        q1 = _load_rows(q_base, offs_m, stride_qn, offs_d1, N, HEAD_DIM)
    # Rows past N get +inf: their positional probabilities are 0 instead of overflowing.
    pos_lse2 = tl.load(POS_LSE2 + h * N + offs_m, mask=offs_m < N, other=float("inf"))
    v_ty = V.dtype.element_ty

    if WHOLE_ROW:  # ROW_N = next_pow2(N) >= N: one tile holds the whole row
        offs_n = tl.arange(0, ROW_N)
        k0 = _load_rows(k_base, offs_n, stride_kn, offs_d0, N, HEAD_DIM)
        k1 = k0
        if D1 > 0:
            k1 = _load_rows(k_base, offs_n, stride_kn, offs_d1, N, HEAD_DIM)
        s = _scores(q0, q1, k0, k1, D1, IEEE) * qk_scale
        valid = offs_n[None, :] < N
        s = tl.where(valid, s, float("-inf"))
        m_i = tl.max(s, 1)
        p = tl.exp2(s - m_i[:, None])
        l_i = tl.sum(p, 1)
        dx, dy = _rel_offsets(offs_m, offs_n, cols)
        p_pos = tl.where(valid, tl.exp2(_pos_arg(dx, dy, w0, w1, w2, pos_lse2[:, None])), 0.0)
        # (1 - s) P_c + s P_pos in one expression, so that few N-wide tiles are live at once.
        mix = (p * ((1.0 - gate) / l_i)[:, None] + gate * p_pos).to(v_ty)
        v0 = _load_rows(v_base, offs_n, stride_vn, offs_d0, N, HEAD_DIM)
        o0 = _mm(mix, v0, tl.zeros([BLOCK_M, D0], tl.float32), IEEE)
        _store_rows(o_base, o0.to(OUT.dtype.element_ty), offs_m, stride_on, offs_d0, N, HEAD_DIM)
        if D1 > 0:
            v1 = _load_rows(v_base, offs_n, stride_vn, offs_d1, N, HEAD_DIM)
            o1 = _mm(mix, v1, tl.zeros([BLOCK_M, D1], tl.float32), IEEE)
            _store_rows(o_base, o1.to(OUT.dtype.element_ty), offs_m, stride_on, offs_d1, N, HEAD_DIM)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc_c0 = tl.zeros([BLOCK_M, D0], tl.float32)
        acc_p0 = tl.zeros([BLOCK_M, D0], tl.float32)
        acc_c1 = tl.zeros([BLOCK_M, D1 if D1 > 0 else 16], tl.float32)
        acc_p1 = tl.zeros([BLOCK_M, D1 if D1 > 0 else 16], tl.float32)
        for start_n in range(0, N, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k0 = _load_rows(k_base, offs_n, stride_kn, offs_d0, N, HEAD_DIM)
            k1 = k0
            if D1 > 0:
                k1 = _load_rows(k_base, offs_n, stride_kn, offs_d1, N, HEAD_DIM)
            s = _scores(q0, q1, k0, k1, D1, IEEE) * qk_scale
            valid = offs_n[None, :] < N
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
            dx, dy = _rel_offsets(offs_m, offs_n, cols)
            p_pos = tl.where(valid, tl.exp2(_pos_arg(dx, dy, w0, w1, w2, pos_lse2[:, None])), 0.0).to(v_ty)
            p = p.to(v_ty)
            v0 = _load_rows(v_base, offs_n, stride_vn, offs_d0, N, HEAD_DIM)
            acc_c0 = _mm(p, v0, acc_c0 * alpha[:, None], IEEE)
            acc_p0 = _mm(p_pos, v0, acc_p0, IEEE)
            if D1 > 0:
                v1 = _load_rows(v_base, offs_n, stride_vn, offs_d1, N, HEAD_DIM)
                acc_c1 = _mm(p, v1, acc_c1 * alpha[:, None], IEEE)
                acc_p1 = _mm(p_pos, v1, acc_p1, IEEE)
        w_c = (1.0 - gate) / l_i
        o0 = acc_c0 * w_c[:, None] + gate * acc_p0
        _store_rows(o_base, o0.to(OUT.dtype.element_ty), offs_m, stride_on, offs_d0, N, HEAD_DIM)
        if D1 > 0:
            o1 = acc_c1 * w_c[:, None] + gate * acc_p1
            _store_rows(o_base, o1.to(OUT.dtype.element_ty), offs_m, stride_on, offs_d1, N, HEAD_DIM)
    lse = (m_i + tl.log2(l_i)) * LN2  # back to natural units: the op's documented lse
    tl.store(LSE + bh * N + offs_m, lse, mask=offs_m < N)


_gpsa_fwd_short = triton.autotune(configs=_FWD_SHORT_CONFIGS, key=["N", "HEAD_DIM"])(_gpsa_fwd_kernel)
_gpsa_fwd_long = triton.autotune(configs=_FWD_LONG_CONFIGS, key=["N", "HEAD_DIM"])(_gpsa_fwd_kernel)
_gpsa_fwd_forced = triton.autotune(configs=_FWD_FORCED_CONFIGS, key=["N", "HEAD_DIM", "BLOCK_N"])(_gpsa_fwd_kernel)


def choose_path(N: int, block_n: int) -> tuple[str, dict]:
    """How the kernels run N keys: ``(mode, fixed launch arguments)``.

    "short" (N <= WHOLE_ROW_MAX_N): the autotuner picks among whole-row and tiled configs.
    "long": tiled configs only. "forced" (``block_n > 0``, a power of two >= 16): the tiled
    online-softmax path with that key block, e.g. to test it at a small N.
    """
    if isinstance(block_n, bool) or not isinstance(block_n, int):
        raise TypeError(f"block_n must be an int; got {type(block_n).__name__}")
    if block_n < 0 or (block_n and (block_n < 16 or block_n & (block_n - 1))):
        raise ValueError(f"block_n must be 0 (automatic) or a power of two >= 16; got {block_n}")
    if block_n:
        return "forced", dict(WHOLE_ROW=False, BLOCK_N=block_n)
    if N <= WHOLE_ROW_MAX_N:
        return "short", {}
    return "long", dict(WHOLE_ROW=False)


def row_width(N: int, mode: str) -> int:
    """ROW_N, the whole-row tile width: next_pow2(N) where whole-row configs may run, else a fixed
    16 so that tiled-only launches do not compile one variant per N."""
    return max(16, triton.next_power_of_2(N)) if mode == "short" else 16


def gpsa_fwd_launch(q, k, v, pos_weight, gating, rows: int, cols: int, scale: float, block_n: int = 0,
                    split_d: bool = False, wrap=lambda kernel: kernel):
    """Run the forward; returns ``(out, lse)``.

    q, k, v: (B, H, N, D), last dim contiguous. pos_weight (H, 3), gating (H,): float32.
    out: (B, H, N, D) in q's dtype, a transpose(1, 2) view of contiguous (B, N, H, D) storage.
    lse: (B, H, N) float32, the content log-sum-exp. ``block_n``: see ``choose_path``; ``split_d``:
    see ``head_dim_split``. ``wrap`` is ``torch.library.wrap_triton``
    inside the registered op (so torch.compile traces the kernels), the identity otherwise.
    """
    B, H, N, D = q.shape
    d0, d1 = head_dim_split(D, split_d)
    mode, path_args = choose_path(N, block_n)
    pos_weight = pos_weight.contiguous()
    gating = gating.contiguous()
    out = torch.empty((B, N, H, D), device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    if B == 0:
        return out, lse
    pos_lse2 = pos_stats_launch(pos_weight, N, cols, wrap)

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_M"]) * B * H,)

    kernel = dict(short=_gpsa_fwd_short, long=_gpsa_fwd_long, forced=_gpsa_fwd_forced)[mode]
    wrap(kernel)[grid](
        q, k, v, out, lse, pos_lse2, pos_weight, gating,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        H, N, cols, scale,
        HEAD_DIM=D, D0=d0, D1=d1, ROW_N=row_width(N, mode), IEEE=q.dtype == torch.float32,
        **path_args,
    )
    return out, lse
