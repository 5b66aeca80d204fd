"""Build of convit_kernels._C: the C++ CPU kernels always, the CUDA kernels where they can build.

Environment:
  CONVIT_SKIP_EXT=1      install pure Python (the reference and Triton backends only)
  FORCE_CUDA=1           build the CUDA sources even when no GPU is visible (needs nvcc and a CUDA torch)
  TORCH_CUDA_ARCH_LIST   CUDA architectures; defaults to "8.0;9.0" when no GPU is visible
  MAX_JOBS               parallel compile jobs (ninja)
  CUDA_HOME              the CUDA toolkit; found from nvcc when unset or when it holds no CUDA headers
A CPU-only install never fails because CUDA is absent.

No -std flag is passed: torch.utils.cpp_extension adds the standard the installed torch needs
(C++17 up to torch 2.13, C++20 from torch 2.14) only when the extension names none.
"""
import glob
import os
import re
import shutil
import subprocess

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _is_cuda_home(path):
    return bool(path) and os.path.isfile(os.path.join(path, "include", "cuda_runtime_api.h"))


def _nvcc_toolkit_root(nvcc):
    """The toolkit that ``nvcc`` really belongs to (it may be a wrapper script outside it)."""
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    try:  # nvcc's dry run prints its own install root as "#$ TOP=<toolkit>/bin/.."
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull], capture_output=True, text=True, timeout=60)
        for match in re.finditer(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, flags=re.M):
            candidates.insert(0, os.path.normpath(match.group(1).strip()))
    except (OSError, subprocess.SubprocessError):
        pass
    return candidates


def _find_cuda_home():
    """``(root, tried)``: a CUDA toolkit root with include/cuda_runtime_api.h (or None) and what was tried.

    cpp_extension guesses CUDA_HOME as the parent of the folder of the ``nvcc`` on PATH, which is
    wrong when that nvcc is a wrapper script outside the toolkit (then its guess has no headers).
    """
    tried = []
    env_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env_home:
        if _is_cuda_home(env_home):
            return env_home, tried
        tried.append(f"CUDA_HOME={env_home} (no include/cuda_runtime_api.h)")
    nvcc = shutil.which("nvcc") or (os.path.join(env_home, "bin", "nvcc") if env_home else None)
    if nvcc and os.path.exists(nvcc):
        for root in _nvcc_toolkit_root(nvcc):
            if _is_cuda_home(root):
                return root, tried
            tried.append(f"{root} (from {nvcc})")
    for root in _system_cuda_roots():
        if _is_cuda_home(root):
            return root, tried
        tried.append(root)
    return None, tried


def _system_cuda_roots():
    return ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]


def _extensions():
    if os.environ.get("CONVIT_SKIP_EXT", "0") == "1":
        print("convit-kernels: CONVIT_SKIP_EXT=1, installing without the C++ extension")
        return [], {}
    import torch

    force_cuda = os.environ.get("FORCE_CUDA", "0") == "1"
    cuda_home = None
    if torch.version.cuda is not None:
        cuda_home, tried = _find_cuda_home()
        if cuda_home is not None:
            if os.environ.get("CUDA_HOME") not in (None, cuda_home):
                print(f"convit-kernels: CUDA_HOME={os.environ['CUDA_HOME']} has no CUDA headers; using {cuda_home}")
            os.environ["CUDA_HOME"] = cuda_home  # read by cpp_extension when it is imported
        elif force_cuda:
            raise RuntimeError(
                "convit-kernels: FORCE_CUDA=1 but no CUDA toolkit with include/cuda_runtime_api.h was found "
                f"(tried: {'; '.join(tried) or 'no nvcc on PATH, no CUDA_HOME'}). Set CUDA_HOME to the toolkit "
                "root (the folder holding bin/nvcc and include/).")
    from torch.utils import cpp_extension

    if cuda_home is not None:
        cpp_extension.CUDA_HOME = cuda_home

    cpp = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    if not cpp:
        return [], {}
    cuda_sources = _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
    with_cuda = bool(cuda_sources) and cuda_home is not None and (torch.cuda.is_available() or force_cuda)
    cxx_flags = ["-O3", "-fopenmp"] if os.name != "nt" else ["/O2"]
    extra_link = ["-fopenmp"] if os.name != "nt" else []
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"  # an empty list crashes cpp_extension
        ext = cpp_extension.CUDAExtension(
            "convit_kernels._C", cpp + cuda_sources,
            define_macros=[("CONVIT_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]},
            extra_link_args=extra_link)
    else:
        if cuda_sources:
            why = ("torch has no CUDA" if torch.version.cuda is None else
                   "no CUDA toolkit found" if cuda_home is None else "no GPU visible")
            print(f"convit-kernels: building the CPU kernels only ({why}; FORCE_CUDA=1 to insist)")
        ext = cpp_extension.CppExtension("convit_kernels._C", cpp, extra_compile_args={"cxx": cxx_flags},
                                         extra_link_args=extra_link)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__":  # pip's build backend runs this file as __main__; tests import its helpers
    ext_modules, cmdclass = _extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
