"""What the Triton forward (triton_fwd) and backward (triton_bwd) share.

- settings read at import (``INTERPRET``, ``AUTOTUNE``) and limits (``WHOLE_ROW_MAX_N``, ``MAX_HEAD_DIM``);
- the ``@triton.jit`` helpers both sets of kernels call, and the positional-statistics kernel;
- the launch-time choices (path, head-dim chunks, tile widths), written with comparisons only so
  that they work on the SymInts the launchers receive under torch.compile's dynamic shapes;
- autotune config helpers: a per-kernel shared-memory estimate that prunes configs which cannot fit
  in one block (227 KB on H100/H200) before the autotuner compiles them;
- ``check_index_range``: the launchers' guard on the int32 parts of the kernels' address arithmetic.

Math and layout: docs/DESIGN.md section 1.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Read once: triton.jit decides at decoration time whether kernels run under the interpreter.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# CONVIT_KERNELS_TRITON_AUTOTUNE=0 (read at import): each kernel runs the first config of its list,
# untimed and unpruned, so every list's first config must run at every supported shape.
AUTOTUNE = os.environ.get("CONVIT_KERNELS_TRITON_AUTOTUNE", "1") != "0"
# The whole-row path holds BLOCK_M x next_pow2(N) scores in registers; beyond 256 keys it would spill.
WHOLE_ROW_MAX_N = 256
MAX_HEAD_DIM = 128
MAX_FORCED_BLOCK_N = 64
# Dynamic shared memory one block may use on H100 / H200 (sm_90); the estimate prunes against the
# current device's own limit where CUDA is present, this one otherwise (offline compiles, tracing).
SM90_SHARED_MEMORY = 227 * 1024
INT32_MAX = 2**31 - 1


# --------------------------------------------------------------------------------------------
# Launch-time choices. N and D may be SymInts (torch.compile, dynamic shapes): only comparisons
# and arithmetic here, no bit operations, so each choice becomes a guard instead of an error.


def next_pow2(n) -> int:
    """The smallest power of two >= n (1 for n <= 1); an int even when n is a SymInt."""
    p = 1
    while p < n:
        p *= 2
    return p


def prev_pow2(n) -> int:
    """The largest power of two <= n (n >= 1); an int even when n is a SymInt."""
    p = 1
    while p * 2 <= n:
        p *= 2
    return p


def head_dim_split(D, split: bool = False) -> tuple[int, int]:
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
        return max(16, next_pow2(D)), 0
    d0 = max(16, prev_pow2(D))
    rest = D - d0
    d1 = 0 if rest <= 0 else max(16, next_pow2(rest))
    return d0, d1


def choose_path(N, block_n: int) -> tuple[str, dict]:
    """How the kernels run N keys: ``(mode, fixed launch arguments)``.

    "short" (N <= WHOLE_ROW_MAX_N): the autotuner picks among whole-row and tiled configs.
    "long": tiled configs only. "forced" (``block_n`` > 0, a power of two from 16 to
    ``MAX_FORCED_BLOCK_N``): the tiled online-softmax path with that key block, e.g. to test it at a
    small N (capped so that every forced config fits in shared memory at D = 128 in fp32).
    """
    if isinstance(block_n, bool) or not isinstance(block_n, int):
        raise TypeError(f"block_n must be an int; got {type(block_n).__name__}")
    if block_n < 0 or (block_n and (block_n < 16 or block_n > MAX_FORCED_BLOCK_N or block_n & (block_n - 1))):
        raise ValueError(f"block_n must be 0 (automatic) or a power of two from 16 to {MAX_FORCED_BLOCK_N}; "
                         f"got {block_n}")
    if block_n:
        return "forced", dict(WHOLE_ROW=False, BLOCK_N=block_n)
    if N <= WHOLE_ROW_MAX_N:
        return "short", {}
    return "long", dict(WHOLE_ROW=False)


def row_width(N, mode: str) -> int:
    """ROW_N, the whole-row tile width: next_pow2(N) where whole-row configs may run, else a fixed
    16 so that tiled-only launches do not compile one variant per N."""
    return max(16, next_pow2(N)) if mode == "short" else 16


def static_int(x) -> int:
    """x as a Python int: a SymInt is specialized (a guard on its value). For sizes that become
    constexprs (the head dim): a kernel is compiled per value anyway."""
    return int(x)


def check_index_range(N, D, B, H, tensors, min_block: int = 16) -> None:
    """Raise ValueError where the kernels' int32 arithmetic would overflow.

    The batch and head offsets (b * stride_b, h * stride_h) and the per-(batch, head) statistics
    offsets are int64 in the kernels, so B * H * N * D may pass 2**31 elements. What stays int32,
    and is checked here: the offsets within one (batch, head) slice, (N - 1) * stride_n + D - 1, of
    every (B, H, N, D) tensor, and the number of programs of the one-axis grids.
    """
    for name, t in tensors.items():
        reach = (N - 1) * t.stride(2) + D - 1
        if reach > INT32_MAX:
            raise ValueError(
                f"{name}: one (batch, head) slice spans {reach + 1} elements (N = {N}, stride along N "
                f"= {t.stride(2)}), past the triton kernels' int32 row offsets (2**31 - 1); "
                "use a layout with a smaller token stride or a smaller N")
    programs = -(-N // min_block) * B * H
    if programs > INT32_MAX:
        raise ValueError(f"B * H * cdiv(N, {min_block}) = {programs} programs, past CUDA's grid limit "
                         "(2**31 - 1); split the batch")


# --------------------------------------------------------------------------------------------
# Autotune configs.


def cfg(block_m, warps, stages=1, **extra) -> triton.Config:
    return triton.Config(dict(BLOCK_M=block_m, **extra), num_warps=warps, num_stages=stages)


def with_kwargs(config: triton.Config, **kwargs) -> triton.Config:
    """A copy of ``config`` with more constexprs, e.g. WHOLE_ROW=False for a tiled config in a list
    that also holds whole-row ones (every config of a list must give every constexpr a value)."""
    return triton.Config(dict(config.kwargs, **kwargs), num_warps=config.num_warps, num_stages=config.num_stages)


def config_table(whole, tiled, forced, tiled_fp32, forced_fp32) -> dict:
    """A kernel's GPU autotune lists keyed by (mode, ieee) (see ``triton_fwd.launch_mode``): N <= 256
    ("short") tries the whole-row configs, then the tiled ones with WHOLE_ROW=False; N > 256 ("long")
    the tiled ones; a forced key block its own list; fp32 (ieee) only small tiled configs."""
    return {
        ("short", False): whole + [with_kwargs(c, WHOLE_ROW=False) for c in tiled],
        ("long", False): tiled,
        ("forced", False): forced,
        ("long", True): tiled_fp32,
        ("forced", True): forced_fp32,
    }


# Under the interpreter, the forward and dq kernels run one small config per (mode, ieee) key
# (once, untimed).
INTERPRET_CONFIGS = {
    ("short", False): cfg(16, 4, WHOLE_ROW=True, BLOCK_N=16),
    ("long", False): cfg(16, 4, BLOCK_N=32),
    ("forced", False): cfg(16, 4),
    ("long", True): cfg(16, 4, BLOCK_N=32),
    ("forced", True): cfg(16, 4),
}


def configs(gpu_configs, interpret_config):
    """The list an autotuner gets: one config under the interpreter (its autotuner then runs the
    kernel once instead of timing it), the first GPU config alone with AUTOTUNE off, else all."""
    if INTERPRET:
        return [interpret_config]
    return gpu_configs if AUTOTUNE else gpu_configs[:1]


_SMEM_LIMIT_CACHE: dict = {}


def shared_memory_limit(named_args) -> int:
    """Dynamic shared memory one block may use on the device of the first tensor argument."""
    dev = next((a.device for a in named_args.values() if isinstance(a, torch.Tensor)), None)
    if dev is None or dev.type != "cuda" or not torch.cuda.is_available():
        return SM90_SHARED_MEMORY
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    if idx not in _SMEM_LIMIT_CACHE:
        props = torch.cuda.get_device_properties(idx)
        _SMEM_LIMIT_CACHE[idx] = getattr(props, "shared_memory_per_block_optin", SM90_SHARED_MEMORY)
    return _SMEM_LIMIT_CACHE[idx]


def shared_memory_pruner(estimate, kernel_name: str):
    """An ``early_config_prune`` that drops configs whose ``estimate(config.kwargs | launch constexprs,
    num_stages)`` bytes of shared memory exceed the device's limit, so they are never compiled.

    ``estimate`` must bound what Triton allocates (tests/test_triton.py checks it against offline
    sm_90 compiles); the dot operands dominate, their element size is 4 bytes where IEEE (fp32) else 2.
    """
    def prune(configs_, named_args, **kwargs):
        limit = shared_memory_limit(named_args)
        kept = [c for c in configs_ if estimate(dict(kwargs, **c.kwargs), c.num_stages) <= limit]
        if not kept:
            raise ValueError(f"{kernel_name}: no autotune config fits in {limit} bytes of shared memory "
                             f"at {dict((k, kwargs[k]) for k in ('HEAD_DIM', 'ROW_N', 'IEEE') if k in kwargs)}")
        return kept
    prune.estimate = estimate
    return prune


def autotuner(jit_fn, configs_, key, estimate, kernel_name):
    """``triton.autotune`` with the shared-memory pruning."""
    return triton.autotune(configs=configs_, key=key,
                           prune_configs_by=dict(early_config_prune=shared_memory_pruner(estimate, kernel_name))
                           )(jit_fn)


# --------------------------------------------------------------------------------------------
# @triton.jit helpers shared by the forward and backward kernels.


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
    """This program's (block, bh, b, h): the grids list the blocks of one (batch, head) together.

    ``bh``, ``b`` and ``h`` come back as int64, so that ``b * stride_b + h * stride_h`` and
    ``bh * N`` cannot overflow when B * H * N * D passes 2**31 (scalar 64-bit arithmetic, once per
    program); the block index stays int32, so the per-row offset vectors stay 32-bit.
    """
    pid = tl.program_id(0)
    bh = pid // num_blocks
    return pid % num_blocks, bh.to(tl.int64), (bh // H).to(tl.int64), (bh % H).to(tl.int64)


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


POS_STATS_BLOCK = 16 if INTERPRET else 64
POS_STATS_WARPS = 4


def pos_stats_launch(pos_weight: torch.Tensor, N, cols: int, wrap=lambda kernel: kernel) -> torch.Tensor:
    """(H, N) float32 positional log-sum-exp in log2 units (see the kernel); ``pos_weight`` (H, 3)
    float32 contiguous."""
    H = pos_weight.shape[0]
    pos_lse2 = torch.empty((H, N), device=pos_weight.device, dtype=torch.float32)
    wrap(_gpsa_pos_stats_kernel)[(triton.cdiv(N, POS_STATS_BLOCK), H)](
        pos_weight, pos_lse2, N, cols, BLOCK_M=POS_STATS_BLOCK, BLOCK_N=POS_STATS_BLOCK,
        num_warps=POS_STATS_WARPS)
    return pos_lse2
