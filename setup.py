"""Build of convit_kernels._C: the C++ CPU kernels always, the CUDA kernels where they can build.

Environment:
  CONVIT_SKIP_EXT=1      install pure Python (the reference and Triton backends only)
  FORCE_CUDA=1           build the CUDA sources even when no GPU is visible (needs nvcc and a CUDA torch)
  TORCH_CUDA_ARCH_LIST   CUDA architectures; defaults to "8.0;9.0" when no GPU is visible
  MAX_JOBS               parallel compile jobs (ninja)
A CPU-only install never fails because CUDA is absent.
"""
import glob
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _extensions():
    if os.environ.get("CONVIT_SKIP_EXT", "0") == "1":
        print("convit-kernels: CONVIT_SKIP_EXT=1, installing without the C++ extension")
        return [], {}
    import torch
    from torch.utils import cpp_extension

    cpp = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    if not cpp:
        return [], {}
    cuda_sources = _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
    force_cuda = os.environ.get("FORCE_CUDA", "0") == "1"
    with_cuda = bool(cuda_sources) and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None and (
        torch.cuda.is_available() or force_cuda)
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"] if os.name != "nt" else ["/O2", "/std:c++17"]
    extra_link = ["-fopenmp"] if os.name != "nt" else []
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"  # an empty list crashes cpp_extension
        ext = cpp_extension.CUDAExtension(
            "convit_kernels._C", cpp + cuda_sources,
            define_macros=[("CONVIT_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17",
                                                           "-lineinfo", "--expt-relaxed-constexpr"]},
            extra_link_args=extra_link)
    else:
        if cuda_sources:
            print("convit-kernels: building the CPU kernels only (no CUDA torch or nvcc; FORCE_CUDA=1 to insist)")
        ext = cpp_extension.CppExtension("convit_kernels._C", cpp, extra_compile_args={"cxx": cxx_flags},
                                         extra_link_args=extra_link)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
