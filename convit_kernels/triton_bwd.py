"""Triton backward kernels of GPSA and their launcher (math: docs/DESIGN.md section 1).

With g = dL/d out, s = sigmoid(gating), P_c / P_pos the content / positional softmaxes and
M = (1 - s) P_c + s P_pos:

    dV = M^T g;  dM = g V^T;  delta_c,i = rowsum(P_c dM)_i;  delta_p,i = rowsum(P_pos dM)_i
    dS = (1 - s) P_c (dM - delta_c);  dQ = scale dS K;  dK = scale dS^T Q
    dZ = s P_pos (dM - delta_p);  dw_h = sum dZ_ij r_ij;  dg_h = s (1 - s) sum_i (delta_p,i - delta_c,i)

Two kernels, no atomics, so the result is bitwise reproducible:

- ``_gpsa_bwd_dq_kernel``, parallel over query blocks: the row sums delta_c, delta_p (one sweep
  over the keys, or none extra on the whole-row path where the program holds the full rows), dQ,
  and per-query-row partial sums of dw_h (3 values) and dg_h (1 value) written to a buffer.
- ``_gpsa_bwd_dkv_kernel``, parallel over key blocks: dK and dV, sweeping the queries with the
  delta_c written by the first kernel.

The partial sums are reduced by torch in a fixed order (a plain sum over batch and rows). They are
kept per query row, not per program, so the buffer's layout does not depend on BLOCK_M: every
config the autotuner tries overwrites all of it, and the winner's last run leaves nothing of the
others behind (with per-program slots, slots only a smaller BLOCK_M wrote were summed in too).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_common import (
    INTERPRET_CONFIGS, LOG2E, _head_params, _load_rows, _mm, _pos_arg, _program_tile, _rel_offsets, _rel_offsets_t,
    _scores, _store_rows, autotuner, cfg, check_index_range, config_table, configs, head_dim_split, pos_stats_launch,
    row_width, static_int,
)
from .triton_fwd import launch_mode

__all__ = ["gpsa_bwd_launch", "kernel_plan"]

# Chosen like the forward sets (see triton_fwd): for bf16 / fp16 whole-row and tiled candidates for
# N <= 256. Some whole-row dq configs compile badly for sm_90 (D = 16 or 128: ~6 KB of stack per
# thread), so the tiled ones must stay in the running. fp32: small tiled configs only.
# The first config of each list must fit at every N and D (CONVIT_KERNELS_TRITON_AUTOTUNE=0 runs it).
_DQ_WHOLE = [cfg(16, 8, WHOLE_ROW=True, BLOCK_N=16), cfg(16, 4, WHOLE_ROW=True, BLOCK_N=16),
             cfg(32, 8, WHOLE_ROW=True, BLOCK_N=16)]
_DQ_TILED = [cfg(64, 8, 2, BLOCK_N=64), cfg(32, 4, 2, BLOCK_N=64), cfg(128, 8, 2, BLOCK_N=64)]
_DQ_FORCED = [cfg(32, 4, 2), cfg(64, 8, 2)]
_DQ_TILED_FP32 = [cfg(16, 4, 1, BLOCK_N=16), cfg(32, 8, 1, BLOCK_N=32)]
_DQ_FORCED_FP32 = [cfg(16, 4, 1)]
DQ_GPU_CONFIGS = config_table(_DQ_WHOLE, _DQ_TILED, _DQ_FORCED, _DQ_TILED_FP32, _DQ_FORCED_FP32)
DKV_GPU_CONFIGS = {
    False: [cfg(64, 8, 2, BLOCK_N=64), cfg(32, 4, 2, BLOCK_N=32), cfg(64, 4, 2, BLOCK_N=32), cfg(32, 4, 2, BLOCK_N=64)],
    True: [cfg(32, 4, 1, BLOCK_N=32)],
}
_DKV_INTERPRET_CONFIG = cfg(16, 4, 1, BLOCK_N=16)


def dq_shared_memory(meta: dict, num_stages: int) -> int:
    """Bytes of shared memory the dq kernel needs (fitted like ``triton_fwd.fwd_shared_memory``): K
    and V tiles are both live (dS K after g V^T), so whole-row configs hold two ROW_N x D tiles."""
    e = 4 if meta["IEEE"] else 2
    d = meta["D0"] + meta["D1"]
    bm, bn = meta["BLOCK_M"], meta["BLOCK_N"]
    if meta["WHOLE_ROW"]:
        rn = meta["ROW_N"]
        return e * (2 * rn * d + bm * rn) + 4096
    left = bm * bn if meta["IEEE"] else 0
    return e * (max(2, num_stages) * bn * d + 2 * bm * d + left) + 4096


def dkv_shared_memory(meta: dict, num_stages: int) -> int:
    """Bytes of shared memory the dK/dV kernel needs: Q and dO tiles of BLOCK_M x D per stage, K or V
    of BLOCK_N x D, the per-query statistics; fp32 dots stage their [key, query] left operands too."""
    e = 4 if meta["IEEE"] else 2
    d = meta["D0"] + meta["D1"]
    bm, bn = meta["BLOCK_M"], meta["BLOCK_N"]
    left = 2 * bm * bn if meta["IEEE"] else 0
    return e * (2 * max(2, num_stages) * bm * d + bn * d + left) + 16 * bm + 4096


@triton.jit
def _key_tile(q0, q1, g0, g1, k_base, v_base, offs_m, offs_n, stride_kn, stride_vn, offs_d0, offs_d1, N, cols,
              qk_scale, lse_c, lse_p, w0, w1, w2,
              HEAD_DIM: tl.constexpr, D1: tl.constexpr, IEEE: tl.constexpr):
    """The queries ``offs_m`` against the keys ``offs_n``: K's head-dim chunks k0, k1, both softmaxes
    recomputed from their log-sum-exps (0 past N), dM = g V^T and the offsets dx, dy."""
    valid = offs_n[None, :] < N
    k0 = _load_rows(k_base, offs_n, stride_kn, offs_d0, N, HEAD_DIM)
    v0 = _load_rows(v_base, offs_n, stride_vn, offs_d0, N, HEAD_DIM)
    k1 = k0
    v1 = v0
    if D1 > 0:
        k1 = _load_rows(k_base, offs_n, stride_kn, offs_d1, N, HEAD_DIM)
        v1 = _load_rows(v_base, offs_n, stride_vn, offs_d1, N, HEAD_DIM)
    s = _scores(q0, q1, k0, k1, D1, IEEE) * qk_scale
    p_c = tl.where(valid, tl.exp2(s - lse_c[:, None]), 0.0)
    dx, dy = _rel_offsets(offs_m, offs_n, cols)
    p_pos = tl.where(valid, tl.exp2(_pos_arg(dx, dy, w0, w1, w2, lse_p[:, None])), 0.0)
    dm = _scores(g0, g1, v0, v1, D1, IEEE)
    return k0, k1, p_c, p_pos, dm, dx, dy


@triton.jit
def _dq_tile(k0, k1, p_c, p_pos, dm, dx, dy, delta_c, delta_p, gate, dq0, dq1, acc_w0, acc_w1, acc_w2,
             D1: tl.constexpr, IEEE: tl.constexpr):
    """Adds one key tile's share to dQ (before the scale) and to the per-row dw sums."""
    ds = ((1.0 - gate) * p_c * (dm - delta_c[:, None])).to(k0.dtype)
    dz = gate * p_pos * (dm - delta_p[:, None])
    dq0 = _mm(ds, k0, dq0, IEEE)
    if D1 > 0:
        dq1 = _mm(ds, k1, dq1, IEEE)
    acc_w0 += tl.sum(dz * dx, 1)
    acc_w1 += tl.sum(dz * dy, 1)
    acc_w2 += tl.sum(dz * (dx * dx + dy * dy), 1)
    return dq0, dq1, acc_w0, acc_w1, acc_w2


@triton.jit
def _gpsa_bwd_dq_kernel(
    Q, K, V, DO, LSE, POS_LSE2, W, G, DQ, DELTA, PART,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_gb, stride_gh, stride_gn,
    stride_dqb, stride_dqh, stride_dqn,
    H, N, cols, scale,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    ROW_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WHOLE_ROW: tl.constexpr,
    IEEE: tl.constexpr,
):
    """dQ, delta_c / delta_p and the dw/dg partials of BLOCK_M queries of one (batch, head).

    Grid: (cdiv(N, BLOCK_M) * B * H,), ordered like the forward's. Writes delta_c to DELTA (B*H, N)
    float32 for the dK/dV kernel, and PART[bh, :, i] (PART: (B*H, 4, N) float32) for each of its
    queries i < N: (dw0, dw1, dw2 summed over the keys, delta_p,i - delta_c,i).
    """
    pid_m, bh, b, h = _program_tile(tl.cdiv(N, BLOCK_M), H)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    g_base = DO + b * stride_gb + h * stride_gh
    w0, w1, w2, qk_scale, gate = _head_params(W, G, h, scale)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < N
    offs_d0 = tl.arange(0, D0)
    offs_d1 = D0 + tl.arange(0, D1 if D1 > 0 else 16)
    q0 = _load_rows(q_base, offs_m, stride_qn, offs_d0, N, HEAD_DIM)
    g0 = _load_rows(g_base, offs_m, stride_gn, offs_d0, N, HEAD_DIM)
    q1 = q0
    g1 = g0
    if D1 > 0:
        q1 = _load_rows(q_base, offs_m, stride_qn, offs_d1, N, HEAD_DIM)
        g1 = _load_rows(g_base, offs_m, stride_gn, offs_d1, N, HEAD_DIM)
    # Both in log2 units; +inf for rows past N makes both probabilities 0 there.
    lse_c = tl.load((LSE + bh * N) + offs_m, mask=row_ok, other=float("inf")) * LOG2E
    lse_p = tl.load((POS_LSE2 + h * N) + offs_m, mask=row_ok, other=float("inf"))

    dq0 = tl.zeros([BLOCK_M, D0], tl.float32)
    dq1 = tl.zeros([BLOCK_M, D1 if D1 > 0 else 16], tl.float32)
    acc_w0 = tl.zeros([BLOCK_M], tl.float32)
    acc_w1 = tl.zeros([BLOCK_M], tl.float32)
    acc_w2 = tl.zeros([BLOCK_M], tl.float32)
    if WHOLE_ROW:  # ROW_N = next_pow2(N) >= N: one tile holds the whole row
        offs_n = tl.arange(0, ROW_N)
        k0, k1, p_c, p_pos, dm, dx, dy = _key_tile(
            q0, q1, g0, g1, k_base, v_base, offs_m, offs_n, stride_kn, stride_vn, offs_d0, offs_d1, N, cols,
            qk_scale, lse_c, lse_p, w0, w1, w2, HEAD_DIM, D1, IEEE)
        delta_c = tl.sum(p_c * dm, 1)
        delta_p = tl.sum(p_pos * dm, 1)
        dq0, dq1, acc_w0, acc_w1, acc_w2 = _dq_tile(
            k0, k1, p_c, p_pos, dm, dx, dy, delta_c, delta_p, gate, dq0, dq1, acc_w0, acc_w1, acc_w2, D1, IEEE)
    else:
        delta_c = tl.zeros([BLOCK_M], tl.float32)
        delta_p = tl.zeros([BLOCK_M], tl.float32)
        for start_n in range(0, N, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k0, k1, p_c, p_pos, dm, dx, dy = _key_tile(
                q0, q1, g0, g1, k_base, v_base, offs_m, offs_n, stride_kn, stride_vn, offs_d0, offs_d1, N, cols,
                qk_scale, lse_c, lse_p, w0, w1, w2, HEAD_DIM, D1, IEEE)
            delta_c += tl.sum(p_c * dm, 1)
            delta_p += tl.sum(p_pos * dm, 1)
        for start_n in range(0, N, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k0, k1, p_c, p_pos, dm, dx, dy = _key_tile(
                q0, q1, g0, g1, k_base, v_base, offs_m, offs_n, stride_kn, stride_vn, offs_d0, offs_d1, N, cols,
                qk_scale, lse_c, lse_p, w0, w1, w2, HEAD_DIM, D1, IEEE)
            dq0, dq1, acc_w0, acc_w1, acc_w2 = _dq_tile(
                k0, k1, p_c, p_pos, dm, dx, dy, delta_c, delta_p, gate, dq0, dq1, acc_w0, acc_w1, acc_w2, D1, IEEE)

    dq_base = DQ + b * stride_dqb + h * stride_dqh
    _store_rows(dq_base, (dq0 * scale).to(DQ.dtype.element_ty), offs_m, stride_dqn, offs_d0, N, HEAD_DIM)
    if D1 > 0:
        _store_rows(dq_base, (dq1 * scale).to(DQ.dtype.element_ty), offs_m, stride_dqn, offs_d1, N, HEAD_DIM)
    tl.store((DELTA + bh * N) + offs_m, delta_c, mask=row_ok)
    part = PART + bh * 4 * N
    tl.store(part + offs_m, acc_w0, mask=row_ok)
    tl.store((part + N) + offs_m, acc_w1, mask=row_ok)
    tl.store((part + 2 * N) + offs_m, acc_w2, mask=row_ok)
    tl.store((part + 3 * N) + offs_m, delta_p - delta_c, mask=row_ok)


@triton.jit
def _gpsa_bwd_dkv_kernel(
    Q, K, V, DO, LSE, POS_LSE2, DELTA, W, G, DK, DV,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_gb, stride_gh, stride_gn,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    H, N, cols, scale,
    HEAD_DIM: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):
    """dK and dV of BLOCK_N keys of one (batch, head), sweeping all queries BLOCK_M at a time.

    Grid: (cdiv(N, BLOCK_N) * B * H,), the key blocks of one (batch, head) adjacent. Works on
    transposed tiles [key, query] so that both products (dV += M^T g, dK += dS^T Q) are plain matmuls.
    """
    pid_n, bh, b, h = _program_tile(tl.cdiv(N, BLOCK_N), H)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    g_base = DO + b * stride_gb + h * stride_gh
    w0, w1, w2, qk_scale, gate = _head_params(W, G, h, scale)
    q_ty = Q.dtype.element_ty
    g_ty = DO.dtype.element_ty

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    key_ok = offs_n[:, None] < N
    offs_d0 = tl.arange(0, D0)
    offs_d1 = D0 + tl.arange(0, D1 if D1 > 0 else 16)
    k0 = _load_rows(k_base, offs_n, stride_kn, offs_d0, N, HEAD_DIM)
    v0 = _load_rows(v_base, offs_n, stride_vn, offs_d0, N, HEAD_DIM)
    k1 = k0
    v1 = v0
    if D1 > 0:
        k1 = _load_rows(k_base, offs_n, stride_kn, offs_d1, N, HEAD_DIM)
        v1 = _load_rows(v_base, offs_n, stride_vn, offs_d1, N, HEAD_DIM)
    dk0 = tl.zeros([BLOCK_N, D0], tl.float32)
    dv0 = tl.zeros([BLOCK_N, D0], tl.float32)
    dk1 = tl.zeros([BLOCK_N, D1 if D1 > 0 else 16], tl.float32)
    dv1 = tl.zeros([BLOCK_N, D1 if D1 > 0 else 16], tl.float32)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < N
        q0 = _load_rows(q_base, offs_m, stride_qn, offs_d0, N, HEAD_DIM)
        g0 = _load_rows(g_base, offs_m, stride_gn, offs_d0, N, HEAD_DIM)
        q1 = q0
        g1 = g0
        if D1 > 0:
            q1 = _load_rows(q_base, offs_m, stride_qn, offs_d1, N, HEAD_DIM)
            g1 = _load_rows(g_base, offs_m, stride_gn, offs_d1, N, HEAD_DIM)
        lse_c = tl.load((LSE + bh * N) + offs_m, mask=row_ok, other=float("inf")) * LOG2E
        lse_p = tl.load((POS_LSE2 + h * N) + offs_m, mask=row_ok, other=float("inf"))
        delta_c = tl.load((DELTA + bh * N) + offs_m, mask=row_ok, other=0.0)
        s_t = _scores(k0, k1, q0, q1, D1, IEEE) * qk_scale
        p_c = tl.where(key_ok, tl.exp2(s_t - lse_c[None, :]), 0.0)
        dx, dy = _rel_offsets_t(offs_n, offs_m, cols)
        p_pos = tl.where(key_ok, tl.exp2(_pos_arg(dx, dy, w0, w1, w2, lse_p[None, :])), 0.0)
        mix = (p_c + gate * (p_pos - p_c)).to(g_ty)
        dv0 = _mm(mix, g0, dv0, IEEE)
        if D1 > 0:
            dv1 = _mm(mix, g1, dv1, IEEE)
        dm = _scores(v0, v1, g0, g1, D1, IEEE)
        ds = ((1.0 - gate) * p_c * (dm - delta_c[None, :])).to(q_ty)
        dk0 = _mm(ds, q0, dk0, IEEE)
        if D1 > 0:
            dk1 = _mm(ds, q1, dk1, IEEE)

    dk_base = DK + b * stride_dkb + h * stride_dkh
    dv_base = DV + b * stride_dvb + h * stride_dvh
    _store_rows(dk_base, (dk0 * scale).to(DK.dtype.element_ty), offs_n, stride_dkn, offs_d0, N, HEAD_DIM)
    _store_rows(dv_base, dv0.to(DV.dtype.element_ty), offs_n, stride_dvn, offs_d0, N, HEAD_DIM)
    if D1 > 0:
        _store_rows(dk_base, (dk1 * scale).to(DK.dtype.element_ty), offs_n, stride_dkn, offs_d1, N, HEAD_DIM)
        _store_rows(dv_base, dv1.to(DV.dtype.element_ty), offs_n, stride_dvn, offs_d1, N, HEAD_DIM)


_DQ_TUNERS = {
    key: autotuner(_gpsa_bwd_dq_kernel, configs(gpu, INTERPRET_CONFIGS[key]),
                   ["N", "HEAD_DIM"] + (["BLOCK_N"] if key[0] == "forced" else []), dq_shared_memory,
                   "_gpsa_bwd_dq_kernel")
    for key, gpu in DQ_GPU_CONFIGS.items()
}
_DKV_TUNERS = {ieee: autotuner(_gpsa_bwd_dkv_kernel, configs(gpu, _DKV_INTERPRET_CONFIG), ["N", "HEAD_DIM"],
                               dkv_shared_memory, "_gpsa_bwd_dkv_kernel")
               for ieee, gpu in DKV_GPU_CONFIGS.items()}


def kernel_plan(N, D, dtype, block_n: int = 0, split_d: bool = False) -> list:
    """``[(name, autotuner, constexprs, gpu_configs)]`` of the two backward kernels, as
    ``triton_fwd.kernel_plan``."""
    D = static_int(D)
    d0, d1 = head_dim_split(D, split_d)
    mode, path_args, ieee = launch_mode(N, dtype, block_n)
    common = dict(HEAD_DIM=D, D0=d0, D1=d1, IEEE=ieee)
    return [("bwd_dq", _DQ_TUNERS[(mode, ieee)], dict(common, ROW_N=row_width(N, mode), **path_args),
             DQ_GPU_CONFIGS[(mode, ieee)]),
            ("bwd_dkv", _DKV_TUNERS[ieee], common, DKV_GPU_CONFIGS[ieee])]


def gpsa_bwd_launch(grad_out, q, k, v, pos_weight, gating, lse, rows: int, cols: int, scale: float,
                    block_n: int = 0, split_d: bool = False, wrap=lambda kernel: kernel):
    """Run the backward; returns ``(grad_q, grad_k, grad_v, grad_pos_weight, grad_gating)``.

    grad_out, q, k, v: (B, H, N, D), last dim contiguous; lse: (B, H, N) float32 from the forward;
    pos_weight (H, 3), gating (H,): float32. grad_q/k/v come back in q's dtype as transpose(1, 2)
    views of (B, N, H, D) storage; grad_pos_weight (H, 3) and grad_gating (H,) in float32.
    ``block_n`` and ``split_d`` as in the forward (any values give the same gradients).
    """
    B, H, N, D = q.shape
    (_, dq_kernel, dq_constexprs, _), (_, dkv_kernel, dkv_constexprs, _) = kernel_plan(N, D, q.dtype, block_n, split_d)
    pos_weight = pos_weight.contiguous()
    gating = gating.contiguous()
    grads = [torch.empty((B, N, H, D), device=q.device, dtype=q.dtype).transpose(1, 2) for _ in range(3)]
    dq, dk, dv = grads
    if B == 0:
        zeros = torch.zeros_like(pos_weight), torch.zeros_like(gating)
        return dq, dk, dv, *zeros
    check_index_range(N, D, B, H, dict(grad_out=grad_out, q=q, k=k, v=v, grad_q=dq, grad_k=dk, grad_v=dv))
    pos_lse2 = pos_stats_launch(pos_weight, N, cols, wrap)
    delta = torch.empty((B * H, N), device=q.device, dtype=torch.float32)
    # Written in full by every dq config (one slot per query row): no zeroing, nothing left over.
    part = torch.empty((B * H, 4, N), device=q.device, dtype=torch.float32)

    def dq_grid(meta):
        return (triton.cdiv(N, meta["BLOCK_M"]) * B * H,)

    def dkv_grid(meta):
        return (triton.cdiv(N, meta["BLOCK_N"]) * B * H,)

    wrap(dq_kernel)[dq_grid](
        q, k, v, grad_out, lse, pos_lse2, pos_weight, gating, dq, delta, part,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2),
        H, N, cols, scale,
        **dq_constexprs,
    )
    wrap(dkv_kernel)[dkv_grid](
        q, k, v, grad_out, lse, pos_lse2, delta, pos_weight, gating, dk, dv,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        H, N, cols, scale,
        **dkv_constexprs,
    )
    # Fixed-order reduction of the per-row partials (no atomics): over batch and query rows.
    sums = part.view(B, H, 4, N).sum(dim=(0, 3))
    sig = torch.sigmoid(gating)
    return dq, dk, dv, sums[:, :3].contiguous(), sums[:, 3] * sig * (1.0 - sig)
