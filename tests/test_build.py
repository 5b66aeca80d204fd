"""The build: the CUDA toolkit search of setup.py, and which kernels the built extension registered.

CI's second environment (a CUDA build of torch, see .ci/run) sets CONVIT_TEST_REQUIRE_CUDA_BUILD=1:
there the CUDA kernels must be compiled, linked and registered for both ops, so a build that
quietly fell back to the CPU kernels fails instead of passing.
"""
import os
import pathlib
import runpy
import stat

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture()
def setup_py(monkeypatch):
    """setup.py's helpers, without running setup() (it only builds when run as __main__)."""
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    ns = runpy.run_path(str(ROOT / "setup.py"), run_name="setup_under_test")
    ns["_system_cuda_roots"].__globals__["_system_cuda_roots"] = lambda: []  # no system toolkit
    return ns


def _script(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _toolkit(root):
    """A fake toolkit: bin/nvcc that reports its root in a dry run (as nvcc does), and the runtime header."""
    (root / "include").mkdir(parents=True)
    (root / "include" / "cuda_runtime_api.h").write_text("/* fake */\n")
    _script(root / "bin" / "nvcc", f'echo "#\\$ TOP={root}/bin/.."\n')
    return root


def test_setup_finds_the_toolkit_behind_an_nvcc_wrapper(setup_py, tmp_path, monkeypatch):
    """The nvcc on PATH is a wrapper script in a folder outside the toolkit, whose parent has no headers
    (cpp_extension's own guess): setup.py finds the real toolkit from nvcc's dry run."""
    toolkit = _toolkit(tmp_path / "cuda-13.0")
    _script(tmp_path / "wrappers" / "bin" / "nvcc", f'exec {toolkit}/bin/nvcc "$@"\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'wrappers' / 'bin'}{os.pathsep}{os.environ['PATH']}")
    root, _ = setup_py["_find_cuda_home"]()
    assert os.path.realpath(root) == os.path.realpath(toolkit)


def test_setup_replaces_a_cuda_home_without_headers(setup_py, tmp_path, monkeypatch):
    toolkit = _toolkit(tmp_path / "cuda")
    monkeypatch.setenv("PATH", f"{toolkit / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "empty"))
    root, tried = setup_py["_find_cuda_home"]()
    assert os.path.realpath(root) == os.path.realpath(toolkit)
    assert any("no include/cuda_runtime_api.h" in t for t in tried)


def test_setup_says_what_it_tried_when_no_toolkit_is_found(setup_py, tmp_path, monkeypatch):
    _script(tmp_path / "bin" / "nvcc", "exit 1\n")  # an nvcc that belongs to no toolkit
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    root, tried = setup_py["_find_cuda_home"]()
    assert root is None
    assert any(str(tmp_path) in t for t in tried), tried


def test_setup_passes_no_cxx_standard_flag():
    """torch.utils.cpp_extension adds the standard the installed torch needs (C++20 from torch 2.14)
    only when the extension passes no -std flag itself."""
    text = (ROOT / "setup.py").read_text()
    assert "-std=" not in text and "/std:" not in text


def test_built_kernels_match_the_build():
    """The CPU kernels are always registered; the CUDA kernels for both ops exactly when the build
    compiled them (required in CI's CUDA-torch environment)."""
    try:
        from convit_kernels import cpp_ops
    except ImportError as err:
        pytest.skip(f"the C++ extension is not built here: {err}")
    has = {(op, key): torch._C._dispatch_has_kernel_for_dispatch_key(f"convit_kernels::{op}", key)
           for op in ("gpsa_fwd", "gpsa_bwd") for key in ("CPU", "CUDA")}
    assert has[("gpsa_fwd", "CPU")] and has[("gpsa_bwd", "CPU")], has
    with_cuda = cpp_ops.built_with_cuda()
    assert has[("gpsa_fwd", "CUDA")] == with_cuda and has[("gpsa_bwd", "CUDA")] == with_cuda, (with_cuda, has)
    if os.environ.get("CONVIT_TEST_REQUIRE_CUDA_BUILD") == "1":
        assert torch.version.cuda is not None, "CONVIT_TEST_REQUIRE_CUDA_BUILD=1 needs a CUDA build of torch"
        assert with_cuda, "the extension was built without its CUDA kernels (FORCE_CUDA=1 and nvcc needed)"


def test_timm_is_there_where_ci_requires_it():
    """CI's torch 2.14 environment installs timm: there the timm tests must run, not skip."""
    if os.environ.get("CONVIT_TEST_REQUIRE_TIMM") != "1":
        pytest.skip("CONVIT_TEST_REQUIRE_TIMM is not set (CI's torch 2.14 environment sets it)")
    import timm  # noqa: F401
