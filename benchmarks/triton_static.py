"""Offline sm_90 compile cost and resources of the Triton GPSA kernels' autotune candidates (no GPU).

For each autotune key (dtype, N, D) this compiles, for an sm_90 target, every config the autotuner
would try on a real GPU (after the shared-memory pruning), as the launchers would launch them, and
prints per config: compile time, registers and stack (spill) bytes per thread (from the bundled
``cuobjdump -res-usage``), dynamic shared memory, and whether it fits an H100/H200 block (227 KB);
then the per-key total, i.e. what the first call of that key costs in compiles alone.

    python benchmarks/triton_static.py                       # the four default keys
    python benchmarks/triton_static.py --keys bf16:196:48 --json out.json
    python benchmarks/triton_static.py --src OLD_DIR          # an older triton_fwd.py / triton_bwd.py

``--src DIR`` loads ``triton_fwd.py`` / ``triton_bwd.py`` (and ``triton_common.py`` if present)
from DIR instead of the installed package, e.g. a checkout of an older commit, to measure "before".
A fresh Triton cache is used, so every compile is real. CPU-heavy (fp32 configs take seconds each):
run it alone. Not a test: the resource limits are checked by tests/test_triton.py.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time
import types

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="triton-static-"))
os.environ["CONVIT_KERNELS_TRITON_AUTOTUNE"] = os.environ.get("CONVIT_KERNELS_TRITON_AUTOTUNE", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

SMEM_LIMIT = 227 * 1024  # H100 / H200: the most dynamic shared memory one block may have
_PTR = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}


def load_modules(src: str | None):
    """(triton_fwd, triton_bwd) from the package, or from the files in ``src``."""
    if src is None:
        from convit_kernels import triton_bwd, triton_fwd
        return triton_fwd, triton_bwd
    pkg = types.ModuleType("_ck_static")
    pkg.__path__ = [os.path.abspath(src)]
    sys.modules["_ck_static"] = pkg
    return importlib.import_module("_ck_static.triton_fwd"), importlib.import_module("_ck_static.triton_bwd")


def _legacy_plan(F, B, dtype, N, D):
    """The kernels and constexprs of the launchers before ``kernel_plan`` existed (commit dbad468)."""
    d0, d1 = F.head_dim_split(D)
    mode, _ = F.choose_path(N, 0)
    common = dict(HEAD_DIM=D, D0=d0, D1=d1, IEEE=dtype == "fp32")
    row = dict(ROW_N=F.row_width(N, mode))
    fwd = dict(short=F._gpsa_fwd_short, long=F._gpsa_fwd_long)[mode]
    dq = dict(short=B._gpsa_bwd_dq_short, long=B._gpsa_bwd_dq_long)[mode]
    return [("fwd", fwd, dict(common, **row), None), ("bwd_dq", dq, dict(common, **row), None),
            ("bwd_dkv", B._gpsa_bwd_dkv, common, None)]


def plan(F, B, dtype, N, D):
    """[(name, autotuner, constexprs, prune)] for one key, as the launchers run it (block_n=0, split_d=False)."""
    if not hasattr(F, "kernel_plan"):
        return _legacy_plan(F, B, dtype, N, D)
    return [(name, tuner, ce, getattr(tuner, "early_config_prune", None))
            for name, tuner, ce, _ in F.kernel_plan(N, D, dtype) + B.kernel_plan(N, D, dtype)]


def signature(fn, dtype, constexprs):
    """Triton signature: tensors (upper-case names) as pointers, ``scale`` fp32, other ints i32.

    Pointers to float32 statistics (LSE, POS_LSE2, W, G, DELTA, PART) stay fp32 whatever the dtype.
    Every ``tl.constexpr`` parameter must have a value: a launch without one fails to bind.
    """
    fp32_args = {"LSE", "POS_LSE2", "W", "G", "DELTA", "PART"}
    missing = [fn.arg_names[i] for i in fn.constexprs if fn.arg_names[i] not in constexprs]
    if missing:
        raise ValueError(f"{fn.__name__}: no value for constexprs {missing}")
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.isupper() and name not in ("H", "N"):
            sig[name] = "*fp32" if name in fp32_args else _PTR[dtype]
        elif name == "scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def resource_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers, stack bytes) per thread from the cuobjdump bundled with Triton, or (None, None)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    fields = dict(tok.split(":", 1) for tok in out.split() if tok.startswith(("REG:", "STACK:")))
    return int(fields.get("REG", -1)), int(fields.get("STACK", -1))


def compile_config(fn, dtype, constexprs, config, legacy=False):
    ce = dict(constexprs, **config.kwargs)
    if legacy and "WHOLE_ROW" in fn.arg_names and "WHOLE_ROW" not in ce:
        # Before the fix, the tiled configs of the N <= 256 lists had no WHOLE_ROW, and launching
        # them failed to bind (TypeError, on a GPU only); measured as if they had WHOLE_ROW=False.
        ce["WHOLE_ROW"] = False
    src = ASTSource(fn=fn, signature=signature(fn, dtype, ce), constexprs=ce)
    t0 = time.perf_counter()
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
    seconds = time.perf_counter() - t0
    regs, stack = resource_usage(kernel.asm["cubin"])
    shared = kernel.metadata.shared
    return dict(seconds=round(seconds, 2), regs=regs, stack=stack, shared=shared, fits=shared <= SMEM_LIMIT)


def describe(config):
    kw = ",".join(f"{k}={v}" for k, v in sorted(config.kwargs.items()))
    return f"{kw} w{config.num_warps} s{config.num_stages}"


def measure(F, B, keys):
    rows = []
    for key in keys:
        dtype, n, d = key.split(":")
        N, D = int(n), int(d)
        total = 0.0
        for name, tuner, ce, prune in plan(F, B, dtype, N, D):
            configs = list(tuner.configs)
            if prune is not None and len(configs) > 1:
                configs = prune(configs, {}, **ce)
            for cfg in configs:
                r = compile_config(tuner.fn, dtype, ce, cfg, legacy=not hasattr(F, "kernel_plan"))
                total += r["seconds"]
                rows.append(dict(key=key, kernel=name, config=describe(cfg), **r))
                print(f"{key:14s} {name:8s} {describe(cfg):55s} {r['seconds']:6.2f}s regs={r['regs']} "
                      f"stack={r['stack']} shared={r['shared']}{'' if r['fits'] else ' OVER 227 KB'}", flush=True)
        rows.append(dict(key=key, kernel="TOTAL", seconds=round(total, 1)))
        print(f"{key:14s} TOTAL {total:.1f}s", flush=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", help="directory with triton_fwd.py / triton_bwd.py to load instead of the package")
    ap.add_argument("--keys", default="fp32:196:48,fp32:196:128,bf16:196:48,bf16:196:128",
                    help="comma-separated dtype:N:D autotune keys")
    ap.add_argument("--json", help="write the rows here as JSON")
    args = ap.parse_args(argv)
    F, B = load_modules(args.src)
    rows = measure(F, B, args.keys.split(","))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
