"""compute-sanitizer memcheck and racecheck on a tiny GPSA case of the cuda backend (stage 8 of gpu_run.sh).

    python3 benchmarks/gpu_sanitize_case.py              # run the case, then under memcheck and racecheck
    python3 benchmarks/gpu_sanitize_case.py --case       # the case alone (what runs under the sanitizer)
    python3 benchmarks/gpu_sanitize_case.py --dry-run    # CPU rehearsal: the case on the cpu backend

The case: forward and backward of ``gpsa_attention(..., backend="cuda")`` at B = 2, H = 2, fp32 and
bf16, on the kernel paths (whole-row N = 50 and tiled N = 300; SIMT D = 40, tensor-core D = 32 and
48), checked against the reference. Only kernels whose name contains "gpsa" are instrumented
(torch's own kernels are not under test), and the caching allocator is off, so every tensor is its
own allocation and an out-of-bounds access lands outside it.

Exit status: 0 passed; 1 the case failed or a tool reported errors; 77 skipped (compute-sanitizer
not found, or it could not run a program on this device: e.g. gVisor runtimes refuse it; the
reason is printed). Lines "STEP: ..." and "RESULT: ..." are what gpu_run.sh puts in its summary.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import re
import shutil
import subprocess
import sys

DONE = "gpsa sanitize case done"
ERROR_EXIT = 97  # what the sanitizer returns when it found errors (--error-exitcode)
# Shapes (N, grid, D): the whole-row and tiled forward, the SIMT and tensor-core kernels.
CASES = ((50, (5, 10), 48), (300, (15, 20), 40), (300, (15, 20), 32))


def run_case(device: str, backend: str) -> None:
    """Forward + backward of every case on ``backend``, each compared with the reference."""
    import torch

    import convit_kernels as ck
    from convit_kernels.testing import make_gpsa_inputs

    for dtype in (torch.float32, torch.bfloat16):
        for n, grid, d in CASES:
            *ts, grid = make_gpsa_inputs(2, 2, n, d, grid, dtype=dtype, device=device, layout="bnhd",
                                         requires_grad=True)
            out = ck.gpsa_attention(*ts, grid, backend=backend)
            grad_out = torch.randn_like(out)
            grads = torch.autograd.grad(out, ts, grad_out)
            want = ck.gpsa_attention(*(t.detach().float() for t in ts), grid, backend="reference")
            err = (out.float() - want).abs().max().item()
            # A smoke check, not the accuracy test (tests/test_cuda_gpu.py): a wrong kernel errs by O(1).
            tol = 1e-4 if dtype == torch.float32 else 5e-2
            finite = all(bool(torch.isfinite(g).all()) for g in grads)
            if not (err <= tol and finite):
                raise SystemExit(f"case N={n} D={d} {dtype}: max error {err:.2e} (tolerance {tol}), "
                                 f"finite grads: {finite}")
    if device == "cuda":
        torch.cuda.synchronize()
    print(DONE, flush=True)


def find_sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        homes.append(str(pathlib.Path(nvcc).resolve().parents[1]))
    try:
        from torch.utils import cpp_extension
        homes.append(cpp_extension.CUDA_HOME)
    except Exception:  # noqa: BLE001 - a missing torch shows up in the case itself
        pass
    for home in homes:
        if home and (pathlib.Path(home) / "bin" / "compute-sanitizer").exists():
            return str(pathlib.Path(home) / "bin" / "compute-sanitizer")
    return None


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def sanitize(tool: str, sanitizer: str, timeout: float | None) -> tuple[str, str]:
    """("passed" | "failed" | "refused", a one-line detail) for one tool on the case."""
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1", CONVIT_KERNELS_ENABLE_CUDA="1")
    # API errors are torch's business (it probes and handles some): report our kernels' accesses only.
    cmd = [sanitizer, f"--tool={tool}", f"--error-exitcode={ERROR_EXIT}", "--kernel-name", "kns=gpsa",
           "--report-api-errors", "no"]
    if tool == "memcheck":
        cmd.append("--leak-check=no")
    cmd += [sys.executable, os.path.abspath(__file__), "--case"]
    print("$ " + " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    log = proc.stdout + proc.stderr
    print(_tail(log, 60), flush=True)
    summary = re.search(r"ERROR SUMMARY: (\d+) error", log)
    n_errors = int(summary.group(1)) if summary else None
    if n_errors:
        return "failed", f"{n_errors} errors (exit status {proc.returncode})"
    if DONE in proc.stdout and proc.returncode == 0:
        return "passed", f"0 errors ({summary.group(0) if summary else 'no error summary printed'})"
    # No error found in our kernels, yet the case did not finish: did the tool itself fail (an
    # unsupported device or runtime, e.g. gVisor) or the case (natively it passed)?
    tool_errors = [ln.strip("= ").strip() for ln in log.splitlines()
                   if ln.startswith("=========") and "ERROR SUMMARY" not in ln and re.search(r"error|not supported|unable|could not|fail", ln, re.I)]
    if tool_errors:
        return "refused", f"exit status {proc.returncode}: {tool_errors[0][:200]}"
    return "failed", f"exit status {proc.returncode}, no sanitizer message: the case failed under the tool (see the log)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", action="store_true", help="run the case alone on the cuda backend")
    parser.add_argument("--dry-run", action="store_true", help="CPU rehearsal: the case on the cpu backend")
    parser.add_argument("--tool-timeout", type=float, default=None, help="seconds per sanitizer run")
    args = parser.parse_args(argv)

    if args.case:
        run_case("cuda", "cuda")
        return 0
    if args.dry_run:
        import convit_kernels as ck

        backend = "cpu" if "cpu" in ck.available_backends("cpu") else "reference"
        run_case("cpu", backend)
        tool = find_sanitizer()
        print(f"STEP: dry run: the case ran on CPU (backend {backend}); compute-sanitizer "
              f"{'found at ' + tool if tool else 'not found'}; memcheck and racecheck need a GPU")
        return 77

    # The case must run natively before its sanitized runs mean anything.
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--case"], capture_output=True, text=True,
                          env=dict(os.environ, CONVIT_KERNELS_ENABLE_CUDA="1"))
    print(_tail(proc.stdout + proc.stderr), flush=True)
    if proc.returncode != 0 or DONE not in proc.stdout:
        print(f"RESULT: the case fails without the sanitizer (exit status {proc.returncode}; see the log)")
        return 1
    print("STEP: the case runs natively", flush=True)
    sanitizer = find_sanitizer()
    if sanitizer is None:
        print("RESULT: skipped: compute-sanitizer not found (PATH, CUDA_HOME, next to nvcc, torch's CUDA_HOME)")
        return 77
    worst = 0
    for tool in ("memcheck", "racecheck"):
        status, detail = sanitize(tool, sanitizer, args.tool_timeout)
        if status == "refused":
            print(f"RESULT: skipped: compute-sanitizer {tool} could not run the case on this device "
                  f"(e.g. a gVisor runtime): {detail}")
            return 77 if worst == 0 else 1
        print(f"STEP: {tool} {status}: {detail}", flush=True)
        worst = max(worst, status == "failed")
    return worst


if __name__ == "__main__":
    sys.exit(main())
