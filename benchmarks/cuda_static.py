"""Static evidence for the CUDA GPSA kernels: what nvcc makes of them for sm_90, no GPU needed.

Compiles every ``csrc/cuda/*.cu`` file and the plain-attention comparison kernel
``benchmarks/cuda_static_ref.cu`` with nvcc for sm_90 (``-O3 -lineinfo -Xptxas -v``, the flags
setup.py uses, no fast math), disassembles the cubins with nvdisasm (line info inline) and reports:

* per kernel and dtype: registers, spills, static shared memory, SASS instruction count, barriers;
* for the kernels that run the ConViT bf16 shape: dynamic shared memory at that shape, the CTAs per
  SM that registers and shared memory allow on an H100/H200 (64 K registers, 228 KB shared memory
  per SM, 227 KB per block, 32 blocks, 2048 threads), and the SASS of their hot loops: a loop is a
  backward branch; the hot loop of a source line is the innermost loop holding an instruction
  attributed to that line (inlined code counts for its call site); the elements one pass of the loop
  processes come from counting one opcode that the source issues a known number of times per
  element (MUFU.EX2, the exp; HMMA, the tensor-core MMA; FMNMX, the max), so loop unrolling by the
  compiler does not change the figure. "instr/elem" is SASS instructions per (query, key) element
  per thread, i.e. warp instructions per 32 elements;
* a prediction at the ConViT-S shape (B = 64 and 256, H = 9, N = 196, D = 48, bf16) from an issue
  model (instructions / (4 warp-instructions per clock per SM)), the MUFU rate, tensor-core rate,
  HBM and L2 bytes; and the same model's figure for the plain-attention kernel (a stand-in for
  SDPA's flash kernel compiled the same way) plus the HBM floor of plain SDPA.

Run: ``python benchmarks/cuda_static.py`` (about 2-4 minutes of nvcc on 2 cores). Needs nvcc, and
nvdisasm (PATH, CUDA_HOME/bin, or the copy that ships with the ``triton`` package). ``--json PATH``
also writes the raw numbers.
"""
import argparse
import concurrent.futures
import importlib.util
import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
REF_CU = pathlib.Path(__file__).resolve().parent / "cuda_static_ref.cu"
FA2_REF_CU = REF_CU.parent / "cuda_static_fa2_ref.cu"
REF_FILES = (REF_CU.name, FA2_REF_CU.name)
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-arch=sm_90", "-Xptxas", "-v", "-cubin"]

# H100 / H200 SXM per SM (sm_90), and device-wide rates used by the prediction.
SM_REGS, SM_SMEM, BLOCK_SMEM_MAX, SM_BLOCKS, SM_THREADS = 65536, 228 * 1024, 227 * 1024, 32, 2048
SMEM_PER_BLOCK_RESERVED = 1024  # the driver reserves 1 KB of shared memory per resident CTA
NUM_SMS, CLOCK_HZ = 132, 1.755e9
ISSUE_PER_CLK = 4      # warp instructions per clock per SM (one per sub-partition)
MUFU_PER_CLK = 16      # MUFU.EX2 lanes per clock per SM
HMMA_TFLOPS = 660e12   # dense bf16 mma.sync (HMMA) rate reachable without wgmma: ~2/3 of 989
HBM_BPS, L2_BPS = 3.35e12, 5.5e12
SHAPE = dict(H=9, N=196, D=48, rows=14, cols=14)


def _tool(name):
    """nvcc / nvdisasm from PATH, CUDA_HOME, or the triton package's bundled CUDA tools."""
    found = shutil.which(name)
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (pathlib.Path(home) / "bin" / name).exists():
            return str(pathlib.Path(home) / "bin" / name)
    spec = importlib.util.find_spec("triton")
    if spec and spec.origin:
        cand = pathlib.Path(spec.origin).parent / "backends" / "nvidia" / "bin" / name
        if cand.exists():
            return str(cand)
    sys.exit(f"cuda_static: {name} not found (PATH, CUDA_HOME, or the triton package)")


def align128(x):
    return (x + 127) // 128 * 128


def ceil_to(x, m):
    return (x + m - 1) // m * m


# ---- parsing ----
_PTXAS_FUNC = re.compile(r"Compiling entry function '(\S+)' for 'sm_\d+'")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers(?:, used (\d+) barriers)?(?:, (\d+) bytes smem)?")
_SASS_FUNC = re.compile(r"^\.text\.(\S+):$")
_SASS_INSN = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;?\s*$")
_SASS_LINE = re.compile(r'//## File "([^"]+)", line (\d+)(?: inlined at "([^"]+)", line (\d+))?')
_SASS_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


def parse_ptxas(log):
    info, cur = {}, None
    for line in log.splitlines():
        m = _PTXAS_FUNC.search(line)
        if m:
            cur = m.group(1)
            info[cur] = dict(regs=0, spill_st=0, spill_ld=0, stack=0, smem_static=0, barriers=0)
            continue
        if cur is None:
            continue
        m = _PTXAS_SPILL.search(line)
        if m:
            info[cur].update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        m = _PTXAS_REGS.search(line)
        if m:
            info[cur].update(regs=int(m.group(1)), barriers=int(m.group(2) or 0), smem_static=int(m.group(3) or 0))
    return info


def parse_sass(text):
    """{mangled name: [insn]}; insn = dict(addr, op, text, lines: set of (file name, line))."""
    funcs, cur, pending, labels = {}, None, set(), {}
    for raw in text.splitlines():
        m = _SASS_FUNC.match(raw.strip())
        if m:
            cur = m.group(1)
            funcs[cur] = []
            labels = {}
            funcs[cur + "#labels"] = labels
            pending = set()
            continue
        if cur is None:
            continue
        m = _SASS_LABEL.match(raw.strip())
        if m:
            labels[m.group(1)] = len(funcs[cur])
            continue
        m = _SASS_LINE.search(raw)
        if m:
            pending.add((pathlib.Path(m.group(1)).name, int(m.group(2))))
            if m.group(3):
                pending.add((pathlib.Path(m.group(3)).name, int(m.group(4))))
            continue
        m = _SASS_INSN.match(raw)
        if m:
            body = m.group(2)
            op_text = re.sub(r"^@!?U?P\w+\s+", "", body)
            op = op_text.split()[0] if op_text else ""
            insn = dict(addr=int(m.group(1), 16), op=op, text=body, lines=set(pending))
            if pending:
                last_lines = set(pending)
            else:
                last_lines = funcs[cur][-1]["lines"] if funcs[cur] else set()
            insn["lines"] = last_lines
            pending = set()
            funcs[cur].append(insn)
    return {k: v for k, v in funcs.items() if not k.endswith("#labels")}, \
        {k[:-7]: v for k, v in funcs.items() if k.endswith("#labels")}


def loops_of(insns, labels):
    """Backward branches: list of (start index, end index inclusive)."""
    out = []
    for idx, ins in enumerate(insns):
        if ins["op"].startswith("BRA"):
            m = _BRANCH_TARGET.search(ins["text"])
            if m and m.group(1) in labels and labels[m.group(1)] <= idx:
                out.append((labels[m.group(1)], idx))
    return out


def hot_loop(insns, labels, src_file, src_line):
    """The innermost loop holding an instruction attributed to (src_file, src_line). A backward branch
    whose range holds an unconditional EXIT is not a loop: it is out-of-line code (e.g. the
    divergent-shuffle fallback after BRA.DIV) jumping back into the body."""
    best = None
    for lo, hi in loops_of(insns, labels):
        if any(insns[t]["text"].startswith("EXIT") for t in range(lo, hi + 1)):
            continue
        if any((src_file, src_line) in insns[t]["lines"] for t in range(lo, hi + 1)):
            if best is None or hi - lo < best[1] - best[0]:
                best = (lo, hi)
    return best


def count_ops(insns, lo, hi, prefix):
    return sum(1 for t in range(lo, hi + 1) if insns[t]["op"].startswith(prefix))


# ---- the kernels on the ConViT bf16 path, their hot loops and shapes ----
# Each hot loop: (label, source file, marker text on the loop's source line, opcode counted, how
# many of that opcode one element costs per thread, (rows, keys) it covers per (b, h)).
# "per element" for HMMA: an m16n8k16 HMMA is 16*8*16 MACs of a warp; a score element of depth D
# costs D MACs, i.e. D / 2048 warp HMMAs = D / 64 per thread-element (32 lanes).
def kernel_specs(version):
    H, N, D = SHAPE["H"], SHAPE["N"], SHAPE["D"]
    n16, n64 = ceil_to(N, 16), ceil_to(N, 64)
    hm = D / 64
    specs = []
    if version == "before":
        lay_q = align128(16 * D * 2)
        lay_kv = align128(64 * D * 2)
        fwd_smem = lay_q + lay_kv + align128(16 * n64 * 4) + align128(16 * n64 * 2) + align128(16 * D * 4)
        specs.append(dict(
            name="fwd whole-row mma", kernel="gpsa_fwd_wholerow_mma_kernel", dir="fwd",
            smem=fwd_smem, ctas_per_bh=math.ceil(N / 16), l2_bytes_per_cta=2 * n64 * D * 2,
            loops=[("S = Q K^T", "wmma::mma_sync(acc, qa, kb, acc);", "HMMA", hm, (n16, n64)),
                   ("row max", "m = fmax(m, a.scale * row[j]);", "FMNMX", 1, (n16, N)),
                   ("row sum", "l += acc_exp(a.scale * row[j] - m);", "MUFU.EX2", 1, (n16, N)),
                   ("mix", "const float p_p = acc_exp(pos_logit(w, grid_offset(i, j, a.cols)) - plse);",
                    "MUFU.EX2", 2, (n16, n64)),
                   ("O = P V", "wmma::mma_sync(out_acc[slot], pa, vb, out_acc[slot]);", "HMMA", hm, (n16, n64))]))
        dq_smem = 2 * align128(16 * D * 2) + 2 * align128(64 * D * 2) + 2 * align128(16 * 64 * 4) + \
            align128(16 * 64 * 2) + align128(16 * D * 4)
        specs.append(dict(
            name="bwd dQ mma", kernel="gpsa_bwd_dq_mma_kernel", dir="bwd",
            smem=dq_smem, ctas_per_bh=math.ceil(N / 16), l2_bytes_per_cta=2 * 2 * n64 * D * 2,
            loops=[("pass 1 (S, dM, Delta)", "const float p_p = acc_exp(pos_logit(w, grid_offset(i, j, a.cols)) - plse[u]);",
                    "MUFU.EX2", 2, (n16, n64)),
                   ("pass 2 (S, dM, dS, dQ)", "const float p_p = acc_exp(pos_logit(w, o) - plse[u]);",
                    "MUFU.EX2", 2, (n16, n64))]))
        dkdv_smem = 2 * align128(16 * D * 2) + 2 * align128(64 * D * 2) + 2 * align128(64 * 16 * 4) + \
            2 * align128(64 * 16 * 2) + align128(3 * 64 * 4) + align128(16 * D * 4)
        specs.append(dict(
            name="bwd dK/dV mma", kernel="gpsa_bwd_dkdv_mma_kernel", dir="bwd",
            smem=dkdv_smem, ctas_per_bh=math.ceil(N / 16), l2_bytes_per_cta=2 * n64 * D * 2,
            loops=[("S, dM, M, dS, dK, dV", "const float p_p = acc_exp(pos_logit(w, grid_offset(i, j, a.cols)) - plse_s[il]);",
                    "MUFU.EX2", 2, (n64, n16))]))
    elif version == "after":
        ld = D + 8
        fwd_smem = align128(64 * ld * 2) + 2 * align128(n16 * ld * 2) + 4 * align128(16 * 20 * 4) + \
            4 * align128(16 * 24 * 2) + align128(4 * 256 * 4) + align128(n16 * 4)
        specs.append(dict(
            name="fwd rows64 mma", kernel="gpsa_fwd_rows64_mma_kernel", dir="fwd",
            instance="Li4E",  # kSteps = 4: the D <= 64 instance
            smem=fwd_smem, ctas_per_bh=math.ceil(N / 64), l2_bytes_per_cta=2 * n16 * D * 2,
            loops=[("pass 1: S, max, sum", "rows64_tile_stats<false>(scr", "MUFU.EX2", 9 / 8, (n16, n16)),
                   ("pass 2: S, mix, O += M V", "rows64_tile_mix<T, false>(scr", "MUFU.EX2", 2, (n16, n16))]))
        bwd_smem = 2 * align128(64 * ld * 2) + 2 * align128(n16 * ld * 2) + 8 * align128(16 * 20 * 4) + \
            8 * align128(16 * 24 * 2) + align128(4 * 256 * 4) + 3 * align128(n16 * 4) + align128(max(n16, 128) * 4)
        specs.append(dict(
            name="bwd dQ rows64 mma", kernel="gpsa_bwd_dq_rows64_kernel", dir="bwd",
            instance="Li4E", smem=bwd_smem, ctas_per_bh=math.ceil(N / 64), l2_bytes_per_cta=2 * n16 * D * 2,
            loops=[("pass 1: S, dM, Delta", "dq64_tile_delta<false>(s_scr", "MUFU.EX2", 2, (n16, n16)),
                   ("pass 2: S, dM, dS, dw, dQ += dS K", "dq64_tile_ds<T, false>(s_scr", "MUFU.EX2", 2, (n16, n16))]))
        specs.append(dict(
            name="bwd dK/dV rows64 mma", kernel="gpsa_bwd_dkdv_rows64_kernel", dir="bwd",
            instance="Li4E", smem=bwd_smem, ctas_per_bh=math.ceil(N / 64), l2_bytes_per_cta=2 * n16 * D * 2,
            loops=[("S^T, dM^T, M, dS, dV += M^T dO, dK += dS^T Q", "dkdv64_tile(s_scr", "MUFU.EX2", 2, (n16, n16))]))
    elif version == "mma_sync":
        # the mma.sync one-pass forward (D = 48 instance) and the WMMA rows64 backward
        ld = D + 8
        fwd_smem = align128(64 * ld * 2) + 2 * align128(n16 * ld * 2)
        specs.append(dict(
            name="fwd mma.sync one pass", kernel="gpsa_fwd_mma_sync_kernel", dir="fwd",
            instance="Li3ELi64E",  # kSteps = 3 (D = 48), 64-key tiles
            # L2 per CTA: K and V, and its 64 rows of the s P_pos fragments
            smem=fwd_smem, ctas_per_bh=math.ceil(N / 64), l2_bytes_per_cta=2 * n16 * D * 2 + 64 * n16 * 2,
            # per lane and 64-key tile: 32 elements, one EX2 each + 2 rescale EX2 (one per row)
            loops=[("one pass: S, max, P_c, O_c += P_c V, O_p += s P_pos V",
                    "c[x] = fast_exp2(fmaf(sc[nb][x], sl2, ms[x / 2]));", "MUFU.EX2", 34 / 32, (n16, n16))],
            tail=["if (j0 + 8 * nb + 2 * tg + (x & 1) >= N) sc[nb][x] = -INFINITY;",
                  "if (jb + (x & 1) >= N) c[x] = 0.0f;"]))
        specs += [s for s in kernel_specs("after") if s["name"] == "bwd dQ rows64 mma"]
        dkdv_smem = 2 * align128(64 * ld * 2) + 2 * align128(n16 * ld * 2) + align128(4 * 256 * 4) + \
            4 * align128(n16 * 4)
        specs.append(dict(
            name="bwd dK/dV mma.sync", kernel="gpsa_bwd_dkdv_mma_sync_kernel", dir="bwd",
            instance="Li3E", smem=dkdv_smem, ctas_per_bh=math.ceil(N / 64), l2_bytes_per_cta=2 * n16 * D * 2,
            loops=[("S^T, dM^T, M^T, dS^T, dV += M^T dO, dK += dS^T Q",
                    "const float pc = fast_exp2(fmaf(st[half][x], sl2, odd ? oc2.y : oc2.x));", "MUFU.EX2", 2,
                    (n16, n16))]))
    else:
        raise ValueError(version)
    return specs


def ref_spec():
    N, D = SHAPE["N"], SHAPE["D"]
    n16 = ceil_to(N, 16)
    ld = D + 8
    smem = align128(64 * ld * 2) + 2 * align128(n16 * ld * 2) + 4 * align128(16 * 20 * 4) + 4 * align128(16 * 24 * 2) \
        + align128(n16 * 4)
    hm = D / 64
    return dict(
        name="plain attention (ref)", file="cuda_static_ref.cu", kernel="plain_attn_fwd_kernel", dir="fwd",
        smem=smem, ctas_per_bh=math.ceil(N / 64), l2_bytes_per_cta=2 * n16 * D * 2,
        loops=[("pass 1: S, max, sum", "REF-HOT: stats", "MUFU.EX2", 9 / 8, (n16, n16)),
               ("pass 2: S, P, O += P V", "REF-HOT: probs", "MUFU.EX2", 1, (n16, n16))])


def fa2_ref_spec():
    N, D = SHAPE["N"], SHAPE["D"]
    n16 = ceil_to(N, 16)
    ld = D + 8
    return dict(
        name="plain attention, FA2 path (ref)", file="cuda_static_fa2_ref.cu", kernel="plain_attn_fa2_fwd_kernel",
        dir="fwd", smem=64 * ld * 2 + 2 * n16 * ld * 2, ctas_per_bh=math.ceil(N / 64), l2_bytes_per_cta=2 * n16 * D * 2,
        loops=[("one pass: S, max, P, O += P V", "REF-HOT: one pass", "MUFU.EX2", 34 / 32, (n16, n16))],
        tail=["REF-TAIL"])


def marker_line(path, marker):
    for num, line in enumerate(path.read_text().splitlines(), start=1):
        if marker in line:
            return num
    return None


# ---- compile + analyse ----
def compile_one(nvcc, nvdisasm, src, tmp, cuda_dir):
    cubin = tmp / (src.stem + ".cubin")
    proc = subprocess.run([nvcc, *NVCC_FLAGS, "-I", str(cuda_dir), str(src), "-o", str(cubin)],
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed on {src.name}:\n{proc.stderr[-4000:]}")
    sass = subprocess.run([nvdisasm, "-gi", "-c", str(cubin)], capture_output=True, text=True, timeout=600)
    if sass.returncode != 0:
        raise RuntimeError(f"nvdisasm failed on {cubin.name}:\n{sass.stderr[-2000:]}")
    return src, parse_ptxas(proc.stdout + proc.stderr), sass.stdout


def operand_ops(insns):
    """How a kernel's operands reach the tensor cores: LDSM (ldmatrix), generic LD.E (not LDS / LDG)
    and MOVM (a register transpose of a col-major WMMA operand) instructions."""
    return dict(ldsm=sum(1 for i in insns if i["op"].startswith("LDSM")),
                ld_generic=sum(1 for i in insns if i["op"].startswith("LD.")),
                movm=sum(1 for i in insns if i["op"].startswith("MOVM")))


def demangle_short(name):
    """'_ZN..28gpsa_fwd_wholerow_mma_kernelI13__nv_bfloat16EE..' -> ('gpsa_fwd_wholerow_mma_kernel', 'bf16')."""
    pos, last = (3, None) if name.startswith("_ZN") else (2, None)
    while pos < len(name) and name[pos].isdigit():
        m = re.match(r"\d+", name[pos:])
        n = int(m.group(0))
        start = pos + len(m.group(0))
        last, pos = name[start:start + n], start + n
    rest = name[pos:]
    dtype = "-"
    if rest.startswith("I"):
        arg = rest[1:]
        dtype = {"13__nv_bfloat16": "bf16", "6__half": "fp16", "f": "fp32", "d": "fp64"}.get(
            next((k for k in ("13__nv_bfloat16", "6__half", "f", "d") if arg.startswith(k)), ""), "-")
    inst = re.search(r"Li(\d+)E", rest)
    if inst:
        dtype += f", kSteps {inst.group(1)}"
    return last or name, dtype


def occupancy(regs, smem, threads=128):
    regs_per_warp = math.ceil(max(regs, 1) * 32 / 256) * 256
    by_regs = SM_REGS // (regs_per_warp * (threads // 32))
    by_smem = SM_SMEM // (smem + SMEM_PER_BLOCK_RESERVED) if smem <= BLOCK_SMEM_MAX else 0
    return min(by_regs, by_smem, SM_BLOCKS, SM_THREADS // threads), by_regs, by_smem


DTYPE_MANGLE = {"bf16": "13__nv_bfloat16", "fp16": "6__half"}


def analyse_spec(spec, sass_by_file, ptx_by_file, label_by_file, src_dir, dtype="bf16"):
    src_path = src_dir / spec["file"]
    funcs, labels, ptx = sass_by_file[spec["file"]], label_by_file[spec["file"]], ptx_by_file[spec["file"]]
    mangled = [f for f in funcs if spec["kernel"] in f and ("I" + DTYPE_MANGLE[dtype] in f or "ref" in spec["file"])
               and spec.get("instance", "") in f]
    if not mangled:
        raise RuntimeError(f"kernel {spec['kernel']} ({dtype}) not in the SASS of {spec['file']}")
    fname = mangled[0]
    insns, labs, info = funcs[fname], labels[fname], ptx.get(fname, {})
    loops = []
    for label, marker, op, per_elem, (rows, keys) in spec["loops"]:
        line = marker_line(src_path, marker)
        loop = hot_loop(insns, labs, spec["file"], line) if line else None
        if loop is None:
            loops.append(dict(label=label, line=line, found=False))
            continue
        lo, hi = loop
        n_op = count_ops(insns, lo, hi, op)
        size = hi - lo + 1
        # Instructions of the masking that only the last key tile runs (a branch skips them on the
        # others): not counted per element, reported apart.
        tail_lines = {(spec["file"], marker_line(src_path, m)) for m in spec.get("tail", [])}
        tail = sum(1 for k in range(lo, hi + 1) if insns[k]["lines"] and insns[k]["lines"] <= tail_lines)
        size -= tail
        ipe = size * per_elem / n_op if n_op else float("nan")
        loops.append(dict(label=label, line=line, found=True, size=size, tail=tail, op=op, n_op=n_op, ipe=ipe,
                          ex2=count_ops(insns, lo, hi, "MUFU.EX2"), lds=count_ops(insns, lo, hi, "LDS"),
                          ex2_pe=count_ops(insns, lo, hi, "MUFU.EX2") * per_elem / n_op if n_op else 0.0,
                          hmma_pe=count_ops(insns, lo, hi, "HMMA") * per_elem / n_op if n_op else 0.0,
                          elems_per_bh=rows * keys))
    occ, by_regs, by_smem = occupancy(info.get("regs", 0), spec["smem"] + info.get("smem_static", 0))
    return dict(spec=spec, dtype=dtype, mangled=fname, regs=info.get("regs"), spills=info.get("spill_st", 0) + info.get("spill_ld", 0),
                smem=spec["smem"] + info.get("smem_static", 0), ctas_per_sm=occ, by_regs=by_regs, by_smem=by_smem,
                sass=len(insns), loops=loops)


def predict(res, B):
    """Seconds for one launch at batch B: max of issue, MUFU, tensor-core, HBM and L2 terms."""
    H, N, D = SHAPE["H"], SHAPE["N"], SHAPE["D"]
    bh = B * H
    warp_insns = ex2 = hmma_flops = 0.0
    for lp in res["loops"]:
        if not lp.get("found"):
            continue
        elems = bh * lp["elems_per_bh"]
        warp_insns += lp["ipe"] * elems / 32
        ex2 += lp["ex2_pe"] * elems
        hmma_flops += lp["hmma_pe"] * elems / 32 * 2 * 16 * 8 * 16
    warps_per_sm = res["ctas_per_sm"] * 4
    # Fewer than 4 warps per scheduler cannot hide MUFU/LDS latency: issue efficiency ~ warps/4.
    eff = min(1.0, warps_per_sm / 16) * 0.8
    t_issue = warp_insns / (ISSUE_PER_CLK * NUM_SMS * CLOCK_HZ * max(eff, 0.05))
    t_mufu = ex2 / (MUFU_PER_CLK * NUM_SMS * CLOCK_HZ)
    t_mma = hmma_flops / HMMA_TFLOPS
    tensors = 4 if res["spec"]["dir"] == "fwd" else 4  # fwd: q, k, v, out; bwd kernel: its reads + writes
    t_hbm = tensors * bh * N * D * 2 / HBM_BPS
    t_l2 = bh * res["spec"]["ctas_per_bh"] * res["spec"]["l2_bytes_per_cta"] / L2_BPS
    terms = dict(issue=t_issue, mufu=t_mufu, mma=t_mma, hbm=t_hbm, l2=t_l2)
    bound = max(terms, key=terms.get)
    return terms[bound], bound, terms


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="also write the raw numbers here")
    ap.add_argument("--cuda-dir", default=str(CUDA_DIR),
                    help="the kernel sources (default csrc/cuda; e.g. an older commit's, exported by git archive)")
    ap.add_argument("--version", default="current",
                    help="hot-loop table: 'before' (the 16-row kernels up to the rows64 forward), 'after', or "
                         "'mma_sync' (the mma.sync forward and the rows64 backward), or 'current' (whichever the sources hold)")
    args = ap.parse_args()
    cuda_dir = pathlib.Path(args.cuda_dir).resolve()
    nvcc, nvdisasm = _tool("nvcc"), _tool("nvdisasm")
    sources = sorted(cuda_dir.glob("*.cu")) + [REF_CU] + ([FA2_REF_CU] if (cuda_dir / "gpsa_mma.cuh").exists() else [])
    sass_by_file, ptx_by_file, label_by_file, rows = {}, {}, {}, []
    with tempfile.TemporaryDirectory() as tmpdir, concurrent.futures.ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(compile_one, nvcc, nvdisasm, s, pathlib.Path(tmpdir), cuda_dir) for s in sources]
        for fut in futures:
            src, ptx, sass = fut.result()
            funcs, labels = parse_sass(sass)
            sass_by_file[src.name], ptx_by_file[src.name], label_by_file[src.name] = funcs, ptx, labels
            for fname, info in ptx.items():
                base, dt = demangle_short(fname)
                insns = funcs.get(fname, [])
                rows.append(dict(file=src.name, kernel=base, dtype=dt, sass=len(insns), **operand_ops(insns), **info))

    print("## Every kernel, sm_90 (nvcc -O3, no fast math)\n")
    print("| file | kernel | dtype | regs | spill B | static smem B | barriers | SASS instrs | CTAs/SM by regs "
          "| LDSM | LD.E | MOVM |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["file"], r["kernel"], r["dtype"])):
        _, by_regs, _ = occupancy(r["regs"], 0)
        print(f"| {r['file']} | {r['kernel']} | {r['dtype']} | {r['regs']} | {r['spill_st'] + r['spill_ld']} | "
              f"{r['smem_static']} | {r['barriers']} | {r['sass']} | {by_regs} | {r['ldsm']} | {r['ld_generic']} "
              f"| {r['movm']} |")

    version = args.version if args.version != "current" else _current_version(cuda_dir)
    specs = kernel_specs(version)
    for spec in specs:
        spec["file"] = _source_of(cuda_dir, spec["kernel"])
    specs.append(ref_spec())
    if FA2_REF_CU.name in sass_by_file:
        specs.append(fa2_ref_spec())
    results, fp16_results = [], []
    for spec in specs:
        src_dir = REF_CU.parent if spec["file"] in REF_FILES else cuda_dir
        results.append(analyse_spec(spec, sass_by_file, ptx_by_file, label_by_file, src_dir))
        if spec["file"] not in REF_FILES:  # the fp16 twin of the same source: nvcc lowers its operands differently
            fp16_results.append(analyse_spec(spec, sass_by_file, ptx_by_file, label_by_file, src_dir, "fp16"))

    print(f"\n## Hot loops at the ConViT-S shape (H={SHAPE['H']}, N={SHAPE['N']}, D={SHAPE['D']}, bf16), "
          f"kernels '{version}'\n")
    print("| kernel | regs | smem/CTA B | CTAs/SM (regs, smem) | loop | SASS in loop (+ last tile only) | counted | instr/elem "
          "| EX2/elem | LDS in loop |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for res in results:
        for lp in res["loops"]:
            if not lp["found"]:
                print(f"| {res['spec']['name']} | | | | {lp['label']} | loop not found (line {lp['line']}) | | | | |")
                continue
            print(f"| {res['spec']['name']} | {res['regs']} | {res['smem']} | {res['ctas_per_sm']} "
                  f"({res['by_regs']}, {res['by_smem']}) | {lp['label']} | {lp['size']} (+{lp['tail']}) | {lp['n_op']} {lp['op']} | "
                  f"{lp['ipe']:.1f} | {lp['ex2_pe']:.2f} | {lp['lds']} |")
        tot = sum(lp["ipe"] * lp["elems_per_bh"] for lp in res["loops"] if lp["found"]) / (SHAPE["N"] ** 2)
        print(f"| {res['spec']['name']} | | | | **sum, per real element** | | | **{tot:.1f}** | | |")

    print("\n## The same hot loops, fp16 instances next to bf16 (instructions per real element, summed)\n")
    print("| kernel | bf16 instr/elem | fp16 instr/elem | bf16 regs | fp16 regs |")
    print("|---|---|---|---|---|")
    for r16, r in zip(fp16_results, results):
        per = [sum(x["ipe"] * x["elems_per_bh"] for x in res["loops"] if x["found"]) / (SHAPE["N"] ** 2)
               for res in (r, r16)]
        print(f"| {r['spec']['name']} | {per[0]:.1f} | {per[1]:.1f} | {r['regs']} | {r16['regs']} |")

    print("\n## Prediction (H100 SXM model: issue 4 warp-instr/clk/SM at 1.755 GHz x 132 SMs, efficiency"
          " 0.8 x min(1, warps/16); MUFU 16/clk/SM; HMMA 660 TFLOP/s; HBM 3.35 TB/s; L2 5.5 TB/s)\n")
    print("| kernel | B | issue us | MUFU us | MMA us | HBM us | L2 us | predicted us (bound) |")
    print("|---|---|---|---|---|---|---|---|")
    totals = {}
    for B in (64, 256):
        for res in results:
            t, bound, terms = predict(res, B)
            key = ({REF_CU.name: "ref", FA2_REF_CU.name: "fa2 ref"}.get(res["spec"]["file"], res["spec"]["dir"]), B)
            totals[key] = totals.get(key, 0.0) + t
            print(f"| {res['spec']['name']} | {B} | " + " | ".join(f"{terms[k] * 1e6:.1f}" for k in
                                                               ("issue", "mufu", "mma", "hbm", "l2"))
                  + f" | {t * 1e6:.1f} ({bound}) |")
    print("\n| B | GPSA fwd us | GPSA bwd us | plain-attention ref fwd us (WMMA) | plain-attention ref fwd us (FA2 path) "
          "| plain SDPA HBM floor fwd us |")
    print("|---|---|---|---|---|---|")
    for B in (64, 256):
        floor = 4 * B * SHAPE["H"] * SHAPE["N"] * SHAPE["D"] * 2 / HBM_BPS
        print(f"| {B} | {totals.get(('fwd', B), 0) * 1e6:.1f} | {totals.get(('bwd', B), 0) * 1e6:.1f} | "
              f"{totals.get(('ref', B), 0) * 1e6:.1f} | {totals.get(('fa2 ref', B), 0) * 1e6:.1f} | {floor * 1e6:.1f} |")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(dict(kernels=rows, hot=[
            dict(name=r["spec"]["name"], regs=r["regs"], smem=r["smem"], ctas_per_sm=r["ctas_per_sm"], loops=r["loops"])
            for r in results]), indent=1, default=str))


def _source_of(cuda_dir, kernel):
    """The .cu file under cuda_dir that defines `kernel` (files were renamed over time: look it up)."""
    pattern = re.compile(r"__global__[^;{]*\b" + re.escape(kernel) + r"\(")
    hits = [p.name for p in sorted(cuda_dir.glob("*.cu")) if pattern.search(p.read_text())]
    if len(hits) != 1:
        raise RuntimeError(f"kernel {kernel}: expected one defining .cu file under {cuda_dir}, found {hits}")
    return hits[0]


def _current_version(cuda_dir):
    """Which hot-loop table matches the sources."""
    text = "".join(p.read_text() for p in sorted(cuda_dir.glob("*.cu")))
    if "gpsa_fwd_mma_sync_kernel" in text:
        return "mma_sync"
    return "after" if "gpsa_fwd_rows64_mma_kernel" in text else "before"


if __name__ == "__main__":
    main()
