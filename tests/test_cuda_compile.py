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
    procs, results = {}, {"objects": tmp}
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
    expected = {"gpsa_launch.cu", "gpsa_fwd_simt.cu", "gpsa_fwd_mma.cu", "gpsa_fwd_mma_sync.cu", "gpsa_bwd_simt.cu",
                "gpsa_bwd_mma.cu", "gpsa_bwd_mma_sync.cu"}
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


def _find_cuobjdump():
    """cuobjdump from PATH, CUDA_HOME, or the copy that ships with the triton package."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (pathlib.Path(home) / "bin" / "cuobjdump").exists():
            return str(pathlib.Path(home) / "bin" / "cuobjdump")
    import importlib.util

    spec = importlib.util.find_spec("triton")
    if spec and spec.origin:
        cand = pathlib.Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if cand.exists():
            return str(cand)
    return None


def sass_functions(obj, arch="sm_90"):
    """{mangled name: SASS text} of one architecture's cubin in an nvcc object file."""
    tool = _find_cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not found (PATH, CUDA_HOME, or the triton package): SASS not inspected")
    proc = subprocess.run([tool, "-sass", "-arch", arch, str(obj)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    parts = re.split(r"^\s*Function : (\S+)\s*$", proc.stdout, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


@pytest.mark.parametrize("source,kernel,instances", [("gpsa_fwd_mma_sync.cu", "gpsa_fwd_mma_sync_kernel", 6),
                                                      ("gpsa_bwd_mma_sync.cu", "gpsa_bwd_dkdv_mma_sync_kernel", 4)])
def test_mma_sync_operands_through_ldmatrix(compile_results, source, kernel, instances):
    """Every instance of the mma.sync kernels, bf16 and fp16, compiled for sm_90: tensor-core operands
    from shared memory go through LDSM (ldmatrix, .trans too), with no generic LD.E and no MOVM (the
    bf16 lowering of the WMMA kernels), and the products are HMMA.16816."""
    rc, log = compile_results[source]
    assert rc == 0, log
    obj = compile_results["objects"] / (pathlib.Path(source).stem + ".o")
    funcs = {name: body for name, body in sass_functions(obj).items() if kernel in name}
    assert len(funcs) == instances, f"expected {instances} instances (bf16, fp16), found {sorted(funcs)}"
    for name, body in funcs.items():
        assert "LDSM.16.M88.4" in body and "LDSM.16.MT88.4" in body, f"{name}: no ldmatrix (.trans)"
        assert "HMMA.16816.F32" in body, f"{name}: no m16n8k16 HMMA"
        assert not re.search(r"\bLD\.E", body), f"{name}: generic LD.E loads"
        assert "MOVM" not in body, f"{name}: MOVM transposes"
