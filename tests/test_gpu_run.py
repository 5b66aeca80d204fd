"""The GPU run script (benchmarks/gpu_run.sh) rehearsed on the CPU, so a typo fails CI, not a GPU window.

``--dry-run`` runs every stage's logic here: the build checks its tools, the GPU test stages select
their tests with the same -k as on a GPU (the ``gpu`` marker then skips them; a selection that
matches nothing fails), the op and model stages time a few CPU cases for real, and the report and
summary are written as on a GPU. The interpreter is this one (PYTHON=sys.executable): in a venv,
``python3`` on PATH may be another.
"""
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_run.sh"
STAGES = ("build", "cuda", "triton16", "op", "timm", "model", "triton32", "sanitize", "report")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def _run(*args, env=None, timeout=600):
    full_env = dict(os.environ, PYTHON=sys.executable, **(env or {}))
    full_env.pop("CONVIT_BENCH_ROUNDS", None)
    return subprocess.run(["bash", str(SCRIPT), *map(str, args)], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def _rehearse(tmp_path, *args, env=None, timeout=120):
    """Runs a --dry-run into tmp_path/out: ``(out, proc, rows)``, rows from its SUMMARY.md."""
    out = tmp_path / "out"
    proc = _run(out, "--dry-run", *args, env=env, timeout=timeout)
    return out, proc, _rows((out / "SUMMARY.md").read_text())


def _rows(summary: str) -> dict:
    """{stage: (status, seconds, budget, detail)} from SUMMARY.md's stage table."""
    rows = {}
    for line in summary.splitlines():
        m = re.match(r"\| (\d+) \| (\w+) \| ([a-z ]+) \|\s*(\d*)\s*\| (\d+) \| (.*) \|$", line)
        if m:
            rows[m.group(2)] = (m.group(3), m.group(4), int(m.group(5)), m.group(6))
    return rows


def _files(out: pathlib.Path):
    return [p.relative_to(out) for p in out.rglob("*") if p.is_file()]


def test_script_parses():
    proc = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_usage_errors(tmp_path):
    (tmp_path / "old.txt").write_text("a previous run")
    proc = _run(tmp_path, "--dry-run", timeout=60)
    assert proc.returncode == 2 and "not empty" in proc.stderr, proc.stderr
    proc = _run(tmp_path / "new", "--dry-run", "--only", "bulid", timeout=60)
    assert proc.returncode == 2 and "unknown stage 'bulid'" in proc.stderr, proc.stderr
    proc = _run(tmp_path / "new", "--dryrun", timeout=60)
    assert proc.returncode == 2 and "unknown option" in proc.stderr, proc.stderr


def test_dry_run_rehearses_every_stage(tmp_path):
    out = tmp_path / "out"
    proc = _run(out, "--dry-run")
    log = proc.stdout[-6000:] + proc.stderr[-3000:]
    summary = (out / "SUMMARY.md").read_text()
    rows = _rows(summary)
    assert tuple(rows) == STAGES, f"stages in SUMMARY.md: {tuple(rows)}\n{log}"
    assert proc.returncode == 0, f"the rehearsal failed (exit status {proc.returncode}):\n{log}"
    assert "no stage failed or was cut off" in summary

    # The GPU-only parts are skipped with their reason; a test selection that matched nothing fails.
    assert rows["build"][0] == "skipped" and "would run: TORCH_CUDA_ARCH_LIST=9.0" in rows["build"][3]
    assert "--no-build-isolation --no-deps" in rows["build"][3] and sys.executable in rows["build"][3]
    for stage, at_least in (("cuda", 40), ("triton16", 20), ("triton32", 10)):
        status, _, _, detail = rows[stage]
        m = re.search(r"all (\d+) selected tests skipped: needs a CUDA GPU", detail)
        assert status == "skipped" and m and int(m.group(1)) >= at_least, (stage, rows[stage])
    assert rows["timm"][0] in ("skipped", "passed"), rows["timm"]
    assert rows["sanitize"][0] == "skipped" and "the case ran on CPU" in rows["sanitize"][3], rows["sanitize"]
    # The benchmark plumbing ran for real: JSON with the commit, the RESULTS table from it.
    for stage in ("op", "model", "report"):
        assert rows[stage][0] == "passed", (stage, rows[stage])
    assert re.search(r"[1-9]\d* passed", rows["op"][3]) and re.search(r"[1-9]\d* passed", rows["model"][3])
    for kind in ("op", "model"):
        (path,) = out.glob(f"cpu-*-{kind}.json")
        data = json.loads(path.read_text())
        assert data["benchmarks"] and data["machine_info"]["convit"]["device"] == "cpu"
        assert all(b["extra_info"]["kind"] == kind and b["stats"]["rounds"] == 1 for b in data["benchmarks"])
    results = (out / "RESULTS.md").read_text()
    assert "### The GPSA op" in results and "### The model" in results
    for stage, (_, seconds, budget, _) in rows.items():
        assert int(seconds) <= budget + 15, f"stage {stage} took {seconds} s, budget {budget} s"

    # At most 8 files, none deeper than OUT/a/b/file, and the summary lists them.
    files = _files(out)
    assert len(files) <= 8, files
    assert all(len(f.parts) <= 3 for f in files), files
    for f in files:
        assert str(f) in summary, f"{f} not listed in SUMMARY.md"
    tests_log = (out / "logs" / "tests.log").read_text()
    for stage in ("build", "cuda", "triton16", "timm", "triton32", "sanitize"):
        assert f"===== stage {stage}: " in tests_log, stage


def test_an_overrunning_stage_is_cut_off_and_the_rest_reports(tmp_path):
    # One second is less than it takes to import torch: the sanitizer rehearsal is cut off.
    out, proc, rows = _rehearse(tmp_path, "--only", "sanitize,report", env={"GPU_RUN_BUDGET_SANITIZE": "1"})
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert rows["sanitize"][0] == "cut off" and "timeout after 1 s" in rows["sanitize"][3], rows["sanitize"]
    assert rows["report"][0] == "skipped" and "no benchmark JSON" in rows["report"][3], rows["report"]
    for stage in ("build", "cuda", "triton16", "op", "timm", "model", "triton32"):
        assert rows[stage][0] == "not run", (stage, rows[stage])
    assert len(_files(out)) <= 8


def test_a_stage_without_time_left_is_skipped(tmp_path):
    # A 45 s run leaves 15 s for the stages (30 s go to the report and summary): under the 20 s minimum.
    _, proc, rows = _rehearse(tmp_path, "--only", "build", env={"GPU_RUN_TOTAL_S": "45"})
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert rows["build"][0] == "skipped" and "no time left" in rows["build"][3], rows["build"]


@pytest.mark.parametrize("output,code,want", [
    ("gpsa sanitize case done\n========= ERROR SUMMARY: 0 errors", 0, "passed"),
    ("========= Invalid __global__ read of size 4 bytes\n========= ERROR SUMMARY: 3 errors", 97, "failed"),
    ("========= Error: Target application terminated before first instrumented API call", 1, "refused"),
    ("Traceback (most recent call last):\nRuntimeError: boom\n========= ERROR SUMMARY: 0 errors", 1, "failed"),
])
def test_sanitizer_outcomes_are_told_apart(tmp_path, output, code, want):
    """gpu_sanitize_case.py's verdict on canned compute-sanitizer output (a stand-in executable)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_sanitize_case", REPO / "benchmarks" / "gpu_sanitize_case.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fake = tmp_path / "compute-sanitizer"
    fake.write_text(f"#!/bin/sh\ncat <<'EOF'\n{output}\nEOF\nexit {code}\n")
    fake.chmod(0o755)
    status, detail = module.sanitize("memcheck", str(fake), timeout=60)
    assert status == want, (status, detail)
