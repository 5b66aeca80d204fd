"""Triton forward kernels of GPSA and their launchers.

Layout and math follow docs/DESIGN.md section 1. One forward call runs two kernels:

- ``_gpsa_pos_stats_kernel`` (in triton_common): the log-sum-exp of the positional logits of every
  (head, query), (H, N) float32. The positional softmax does not depend on the batch, so this is
  done once per call and costs H x N x N exponentials, nothing next to the attention itself.
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

import torch
import triton
import triton.language as tl

# INTERPRET, MAX_HEAD_DIM, WHOLE_ROW_MAX_N, choose_path, head_dim_split, pos_stats_launch: also used as
# triton_fwd.* (triton_ops, tests), so re-exported here.
from .triton_common import (  # noqa: F401
    INTERPRET, INTERPRET_CONFIGS, LN2, MAX_HEAD_DIM, WHOLE_ROW_MAX_N, _head_params, _load_rows, _mm, _pos_arg,
    _program_tile, _rel_offsets, _scores, _store_rows, autotuner, cfg, check_index_range, choose_path, config_table,
    configs, head_dim_split, pos_stats_launch, row_width, static_int, with_kwargs,
)

__all__ = ["gpsa_fwd_launch", "kernel_plan", "pos_stats_launch", "head_dim_split", "INTERPRET", "WHOLE_ROW_MAX_N"]


# --------------------------------------------------------------------------------------------
# The forward kernel.

# Autotuning, keyed on (N, D) and, by Triton, the argument dtypes.
# bf16 / fp16 (tensor-core dots): for N <= WHOLE_ROW_MAX_N the candidates are whole-row configs
# AND tiled ones (a whole row is not always the fastest: where it spills registers, e.g. D = 128, a
# tiled config wins); beyond, tiled configs only; with a forced key block (block_n > 0), tiled
# configs without BLOCK_N. These keep configs that compile for sm_90 (bf16, D = 48, N = 196) with at
# most a few dozen bytes of register spill per thread (cuobjdump resource usage; e.g. whole-row
# BLOCK_M 32 x 4 warps and 64 x 8 warps spill 288 / 472 bytes and were dropped).
# fp32 (IEEE dots, compiled to FMA code, each config seconds to compile): the tiled path only, with
# small tiles that fit and barely spill; whole-row fp32 configs spilled KBs per thread (NOTES.md).
# The first config of each list runs alone with CONVIT_KERNELS_TRITON_AUTOTUNE=0: it must fit in
# shared memory at every N and D (tests/test_triton.py compiles it for sm_90 at the GPU test shapes).
_FWD_WHOLE = [cfg(16, 4, WHOLE_ROW=True, BLOCK_N=16), cfg(16, 8, WHOLE_ROW=True, BLOCK_N=16),
              cfg(32, 8, WHOLE_ROW=True, BLOCK_N=16)]
_FWD_TILED = [cfg(64, 8, 2, BLOCK_N=64), cfg(32, 4, 2, BLOCK_N=64), cfg(128, 8, 2, BLOCK_N=64)]
_FWD_FORCED = [cfg(32, 4, 2), cfg(64, 8, 2)]
_FWD_TILED_FP32 = [cfg(32, 8, 1, BLOCK_N=32), cfg(16, 4, 1, BLOCK_N=32)]
_FWD_FORCED_FP32 = [cfg(32, 8, 1)]
# Keyed by (mode, ieee); see ``launch_mode``.
FWD_GPU_CONFIGS = config_table(_FWD_WHOLE, _FWD_TILED, _FWD_FORCED, _FWD_TILED_FP32, _FWD_FORCED_FP32)


def fwd_shared_memory(meta: dict, num_stages: int) -> int:
    """Bytes of shared memory the forward kernel needs with constexprs ``meta`` (launch and config).

    Fitted to Triton 3.6 sm_90 compiles (benchmarks/NOTES.md), plus 4 KB of slack: whole rows hold
    the K (then V) tile of ROW_N x D and the mixed probabilities; tiled configs K and V tiles per
    pipeline stage (two at least) and Q; fp32 dots (FMA code) stage their left operands too.
    """
    e = 4 if meta["IEEE"] else 2
    d = meta["D0"] + meta["D1"]
    bm, bn = meta["BLOCK_M"], meta["BLOCK_N"]
    if meta["WHOLE_ROW"]:
        rn = meta["ROW_N"]
        return e * (rn * d + bm * rn) + 4096
    # fp32: the probabilities (left operands) staged too; bf16 / fp16: a layout-conversion scratch
    left = 2 * bm * bn if meta["IEEE"] else bm * bn // 2
    return e * (max(2, num_stages) * bn * d + bm * d + left) + 4096


@triton.jit
def _key_scores(q0, q1, k_base, offs_n, stride_kn, offs_d0, offs_d1, N, qk_scale, HEAD_DIM: tl.constexpr,
                D1: tl.constexpr, IEEE: tl.constexpr):
    """The query tile's scaled content logits (log2 units) against keys ``offs_n``; -inf past N."""
    k0 = _load_rows(k_base, offs_n, stride_kn, offs_d0, N, HEAD_DIM)
    k1 = k0
    if D1 > 0:
        k1 = _load_rows(k_base, offs_n, stride_kn, offs_d1, N, HEAD_DIM)
    s = _scores(q0, q1, k0, k1, D1, IEEE) * qk_scale
    return tl.where(offs_n[None, :] < N, s, float("-inf"))


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
    pos_lse2 = tl.load((POS_LSE2 + h * N) + offs_m, mask=offs_m < N, other=float("inf"))
    v_ty = V.dtype.element_ty

    if WHOLE_ROW:  # ROW_N = next_pow2(N) >= N: one tile holds the whole row
        offs_n = tl.arange(0, ROW_N)
        s = _key_scores(q0, q1, k_base, offs_n, stride_kn, offs_d0, offs_d1, N, qk_scale, HEAD_DIM, D1, IEEE)
        valid = offs_n[None, :] < N
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
            s = _key_scores(q0, q1, k_base, offs_n, stride_kn, offs_d0, offs_d1, N, qk_scale, HEAD_DIM, D1, IEEE)
            valid = offs_n[None, :] < N
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
    tl.store((LSE + bh * N) + offs_m, lse, mask=offs_m < N)


_FWD_TUNERS = {
    key: autotuner(_gpsa_fwd_kernel, configs(gpu, INTERPRET_CONFIGS[key]),
                   ["N", "HEAD_DIM"] + (["BLOCK_N"] if key[0] == "forced" else []), fwd_shared_memory,
                   "_gpsa_fwd_kernel")
    for key, gpu in FWD_GPU_CONFIGS.items()
}


def _dtype_name(dtype) -> str:
    if isinstance(dtype, str):
        return dtype
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def launch_mode(N, dtype, block_n: int = 0) -> tuple[str, dict, bool]:
    """``(mode, fixed launch arguments, ieee)`` for N keys in ``dtype`` (a torch dtype or "fp32" /
    "bf16" / "fp16"): ``choose_path``, except that fp32 never takes the whole-row path."""
    ieee = _dtype_name(dtype) == "fp32"
    mode, path_args = choose_path(N, block_n)
    if ieee and mode == "short":
        mode, path_args = "long", dict(WHOLE_ROW=False)
    return mode, path_args, ieee


def kernel_plan(N, D, dtype, block_n: int = 0, split_d: bool = False) -> list:
    """``[(name, autotuner, constexprs, gpu_configs)]``: the autotuned forward kernel a call with these
    sizes launches, the constexprs the launcher passes (the config adds BLOCK_M, BLOCK_N, WHOLE_ROW)
    and the config list it has on a GPU (the autotuner's own list is one config under the interpreter).
    The launcher runs exactly this; benchmarks/triton_static.py and the tests compile from it."""
    D = static_int(D)
    d0, d1 = head_dim_split(D, split_d)
    mode, path_args, ieee = launch_mode(N, dtype, block_n)
    constexprs = dict(HEAD_DIM=D, D0=d0, D1=d1, ROW_N=row_width(N, mode), IEEE=ieee, **path_args)
    return [("fwd", _FWD_TUNERS[(mode, ieee)], constexprs, FWD_GPU_CONFIGS[(mode, ieee)])]


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
    ((_, kernel, constexprs, _),) = kernel_plan(N, D, q.dtype, block_n, split_d)
    pos_weight = pos_weight.contiguous()
    gating = gating.contiguous()
    out = torch.empty((B, N, H, D), device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    if B == 0:
        return out, lse
    check_index_range(N, D, B, H, dict(q=q, k=k, v=v, out=out))
    pos_lse2 = pos_stats_launch(pos_weight, N, cols, wrap)

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_M"]) * B * H,)

    wrap(kernel)[grid](
        q, k, v, out, lse, pos_lse2, pos_weight, gating,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        H, N, cols, scale,
        **constexprs,
    )
    return out, lse
