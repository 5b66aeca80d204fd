"""Compile checks of the CUDA sources, runnable on a machine without a GPU (CI runs them).

Every ``csrc/cuda/*.cu`` file is compiled with nvcc for sm_80 and sm_90 (the kernels include no
torch header, so no CUDA build of torch is needed); the torch glue ``gpsa_cuda.cpp`` gets a g++
syntax check against the installed torch headers where they are present. Tests skip, with the
reason, where nvcc or g++ is missing. The compilers run in parallel: about 65 s of CPU time (1-3 min
wall-clock on 2 shared cores).
"""
import glob
import os
import pathlib
import re
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
CU_FILES = sorted(CUDA_DIR.glob("*.cu"))
# The flags setup.py gives nvcc (no -std: nvcc's default, or the one cpp_extension adds for torch), plus
# warnings as errors: a warning in a kernel is a bug here.
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-Werror", "all-warnings",
              "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
TIMEOUT_S = 600


def _find_nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc:
        return nvcc
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (pathlib.Path(home) / "bin" / "nvcc").exists():
            return str(pathlib.Path(home) / "bin" / "nvcc")
    return None


def _find_cuda_include(nvcc, torch_cuda_home):
    homes = [pathlib.Path(nvcc).resolve().parents[1], os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
             torch_cuda_home, "/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for home in homes:
        if home and (pathlib.Path(home) / "include" / "cuda_runtime_api.h").exists():
            return pathlib.Path(home) / "include"
    return None


def _torch_cxx_std():
    """The C++ standard the installed torch's headers need: C++20 from torch 2.14 on, C++17 before.

    It is the flag torch.utils.cpp_extension adds when an extension passes none (setup.py passes none).
    """
    import torch

    major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    return "-std=c++20" if (major, minor) >= (2, 14) else "-std=c++17"


def _glue_command(tmp, nvcc):
    """g++ -fsyntax-only of gpsa_cuda.cpp, or (None, reason) where it cannot run here."""
    gxx = shutil.which("g++") or shutil.which("c++")
    if gxx is None:
        return None, "no C++ compiler (g++) on PATH"
    try:
        from torch.utils import cpp_extension
    except Exception as err:  # noqa: BLE001
        return None, f"torch is not importable: {err}"
    include_paths = cpp_extension.include_paths()
    if not any((pathlib.Path(p) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists() for p in include_paths):
        return None, "the installed torch is a CPU build (no c10/cuda/impl/cuda_cmake_macros.h); CI checks the glue with its CUDA torch"
    cuda_include = _find_cuda_include(nvcc, cpp_extension.CUDA_HOME)
    if cuda_include is None:
        return None, "no CUDA include directory with cuda_runtime_api.h found"
    # No stub headers: the glue must compile against a bare toolkit (nvcc and cudart only), as setup.py builds it.
    cmd = [gxx, _torch_cxx_std(), "-fsyntax-only", "-DCONVIT_WITH_CUDA"]
    cmd += [f"-I{p}" for p in include_paths] + [f"-I{cuda_include}", str(CUDA_DIR / "gpsa_cuda.cpp")]
    return cmd, ""


@pytest.fixture(scope="module")
def compile_results(tmp_path_factory):
    """Runs every compiler at once; maps a source name to (returncode, stderr) or a skip reason."""
    nvcc = _find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH, CUDA_HOME, /usr/local/cuda): the CUDA sources cannot be compile-checked")
    tmp = tmp_path_factory.mktemp("cuda_compile")
    procs, results = {}, {}
    for cu in CU_FILES:
        cmd = [nvcc, "-c", *NVCC_FLAGS, str(cu), "-o", str(tmp / (cu.stem + ".o"))]
        procs[cu.name] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    glue_cmd, reason = _glue_command(tmp, nvcc)
    if glue_cmd is None:
        results["gpsa_cuda.cpp"] = reason
    else:
        procs["gpsa_cuda.cpp"] = subprocess.Popen(glue_cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                  text=True)
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            err = f"timed out after {TIMEOUT_S} s\n{err}"
        results[name] = (proc.returncode, out + err)
    return results


def test_cuda_sources_exist():
    names = {p.name for p in CU_FILES}
    expected = {"gpsa_launch.cu", "gpsa_fwd_simt.cu", "gpsa_fwd_mma.cu", "gpsa_bwd_simt.cu", "gpsa_bwd_mma.cu"}
    assert expected <= names, f"missing CUDA sources; found {sorted(names)}"


@pytest.mark.parametrize("name", [p.name for p in CU_FILES])
def test_cu_compiles_for_sm80_and_sm90(compile_results, name):
    rc, log = compile_results[name]
    assert rc == 0, f"nvcc failed on csrc/cuda/{name} (exit {rc}):\n{log}"


def test_glue_syntax(compile_results):
    result = compile_results["gpsa_cuda.cpp"]
    if isinstance(result, str):
        pytest.skip(f"glue syntax check not possible here: {result}")
    rc, log = result
    errors = "\n".join(line for line in log.splitlines() if "error" in line)
    assert rc == 0, f"g++ -fsyntax-only failed on csrc/cuda/gpsa_cuda.cpp (exit {rc}):\n{errors or log}"


def test_kernels_include_no_torch_header():
    """The .cu/.cuh/.h files must compile without torch: only CUDA and standard headers."""
    for path in sorted(CUDA_DIR.glob("*.cu")) + sorted(CUDA_DIR.glob("*.cuh")) + sorted(CUDA_DIR.glob("*.h")):
        includes = re.findall(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', path.read_text(), flags=re.M)
        bad = [inc for inc in includes if inc.split("/")[0] in ("torch", "ATen", "c10", "pybind11", "Python.h")]
        assert not bad, f"csrc/cuda/{path.name} includes torch/Python headers {bad}; kernels must not"
