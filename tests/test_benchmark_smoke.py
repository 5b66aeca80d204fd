"""The benchmark suite cannot rot: tiny runs of it in a subprocess, and its report.

The suite itself (``pytest benchmarks --benchmark-only``) is not part of the test run; these run
a handful of its cases on the CPU (CONVIT_BENCH_DEVICE=cpu, whatever this machine has), once with
timing disabled and once timed with two rounds, and turn the JSON into the RESULTS table.
"""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_suite(*args, **env):
    full_env = dict(os.environ, CONVIT_BENCH_DEVICE="cpu", **env)
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", *args]
    result = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-2000:]}"
    return result.stdout


def test_benchmark_suite_runs_with_timing_disabled():
    # Every op mode of one provider, one model training step, and a case that must be skipped with
    # its reason shown (triton is never timed on CPU: there it runs under the interpreter).
    out = _run_suite("benchmarks", "--benchmark-disable", "-k",
                     "(test_gpsa_op and convit_tiny and composed) or (test_gpsa_op and convit_tiny and fwd_bwd "
                     "and triton) or (test_model_step and convit_tiny and reference and eager and train)")
    assert "4 passed, 1 skipped" in out, out[-3000:]
    assert "Triton interpreter" in out, "the skip reason of the triton case is not shown:\n" + out[-3000:]


def test_benchmark_json_and_report(tmp_path):
    json_path, md_path = tmp_path / "cpu.json", tmp_path / "RESULTS.md"
    cases = [f"benchmarks/bench_op.py::test_gpsa_op[convit_tiny-8-fwd_bwd-{p}]" for p in ("composed", "sdpa")]
    _run_suite(*cases, "--benchmark-only", f"--benchmark-json={json_path}", CONVIT_BENCH_ROUNDS="2")
    data = json.loads(json_path.read_text())
    info = data["machine_info"]["convit"]
    assert info["torch"] and info["device"] == "cpu" and "command" in info
    # The CPU model and the level of the cpu backend (the subprocess inherits this process's environment).
    import torch

    import convit_kernels  # noqa: F401 - loads the ops
    assert info["cpu_isa"] == torch.ops.convit_kernels.cpu_isa() and info["cpu_model"], info
    assert data["commit_info"].get("id"), "pytest-benchmark recorded no commit"
    benches = {b["extra_info"]["provider"]: b for b in data["benchmarks"]}
    assert set(benches) == {"composed", "sdpa"}
    for b in benches.values():
        assert b["stats"]["rounds"] == 2 and b["stats"]["median"] > 0
        # A fwd+bwd at B=8, H=4, N=196 allocates at least its (B, H, N, D) fp32 output: 1.2 MB.
        assert b["extra_info"]["peak_bytes"] >= 8 * 4 * 196 * 48 * 4, b["extra_info"]

    subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "report.py"), str(json_path), "-o", str(md_path)],
                   check=True, capture_output=True, text=True)
    table = md_path.read_text()
    assert "### The GPSA op" in table and info["torch"] in table
    assert "| convit_tiny (4) | 8 | fwd_bwd | composed (SDPA + positional matmul) |" in table
    assert "| 1.00x |" in table  # the composed row against itself
    assert f"cpu backend ISA level **{info['cpu_isa']}**" in table and info["cpu_model"] in table
