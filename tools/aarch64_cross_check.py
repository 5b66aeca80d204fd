"""Cross-compiles the C++ sources of convit_kernels._C for aarch64 Linux and links them into a shared
library against an aarch64 libtorch: the check that the CPU extension builds on Grace / Graviton hosts
without such a machine.

    python tools/aarch64_cross_check.py --torch DIR [--cxx aarch64-linux-gnu-g++] [--jobs 2]

DIR is the ``torch`` folder of an aarch64 torch wheel of the same version as the installed one (it
holds include/ and lib/). To get one (Debian / Ubuntu; ~430 MB for torch 2.13):

    apt-get install g++-aarch64-linux-gnu
    pip download --no-deps --only-binary :all: --platform manylinux_2_28_aarch64 \\
        --python-version 3.11 torch==2.13.0 -d /tmp/whl
    unzip -q /tmp/whl/torch-*.whl 'torch/include/*' 'torch/lib/*' 'torch/version.py' -d /tmp/whl

then ``--torch /tmp/whl/torch``. The flags are the ones setup.py gives the CPU extension (-O3
-fopenmp, no -m flag), with the C++ standard cpp_extension picks for that torch. Python's headers are
the running interpreter's (only the module stub in csrc/gpsa_ops.cpp needs them). Exit status 0 when
every source compiled and the library linked; the compiler's errors otherwise.
"""
import argparse
import concurrent.futures
import glob
import os
import subprocess
import sys
import sysconfig
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sources():
    return sorted(glob.glob(os.path.join(HERE, "csrc", "*.cpp")) + glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp")))


def cxx_standard(torch_dir):
    """-std=c++17 for torch up to 2.13, c++20 from 2.14 (what cpp_extension passes)."""
    version_py = os.path.join(torch_dir, "version.py")
    version = ""
    if os.path.isfile(version_py):
        with open(version_py) as f:
            for line in f:
                if line.startswith("__version__"):
                    version = line.split("=", 1)[1].strip().strip("'\"")
    major, minor = (int(x) for x in (version.split(".")[:2] if version else ("2", "13")))
    return "-std=c++20" if (major, minor) >= (2, 14) else "-std=c++17"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch", required=True, help="the torch folder of an aarch64 torch wheel")
    parser.add_argument("--cxx", default="aarch64-linux-gnu-g++")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    inc = os.path.join(args.torch, "include")
    if not os.path.isdir(os.path.join(inc, "ATen")):
        parser.error(f"--torch {args.torch}: no include/ATen (pass the torch folder of an unpacked aarch64 wheel)")
    flags = [cxx_standard(args.torch), "-O3", "-fopenmp", "-fPIC", "-DTORCH_API_INCLUDE_EXTENSION_H",
             "-DTORCH_EXTENSION_NAME=_C", "-D_GLIBCXX_USE_CXX11_ABI=1", "-I", inc,
             "-I", os.path.join(inc, "torch", "csrc", "api", "include"), "-I", sysconfig.get_paths()["include"]]
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        def compile_one(src):
            obj = os.path.join(tmp, os.path.relpath(src, HERE).replace(os.sep, "_") + ".o")
            res = subprocess.run([args.cxx, *flags, "-c", src, "-o", obj], capture_output=True, text=True)
            return src, obj, res

        with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as pool:
            results = list(pool.map(compile_one, sources()))
        failed = [(src, res) for src, _, res in results if res.returncode != 0]
        for src, res in failed:
            print(f"FAILED {os.path.relpath(src, HERE)}:\n{res.stderr[-4000:]}", file=sys.stderr)
        if failed:
            return 1
        so = os.path.join(tmp, "_C.so")
        link = [args.cxx, "-shared", "-fopenmp", *(obj for _, obj, _ in results), "-o", so,
                "-L", os.path.join(args.torch, "lib"), "-lc10", "-ltorch_cpu", "-ltorch", "-ltorch_python"]
        res = subprocess.run(link, capture_output=True, text=True)
        if res.returncode != 0:
            print(f"LINK FAILED:\n{res.stderr[-4000:]}", file=sys.stderr)
            return 1
        arch = subprocess.run(["file", so], capture_output=True, text=True).stdout.strip() if _has("file") else ""
    print(f"aarch64 build ok: {len(results)} sources compiled and linked in {time.time() - start:.0f} s "
          f"({args.cxx}, {cxx_standard(args.torch)}){' - ' + arch.split(':', 1)[1].strip() if arch else ''}")
    return 0


def _has(tool):
    return any(os.access(os.path.join(p, tool), os.X_OK) for p in os.environ.get("PATH", "").split(os.pathsep))


if __name__ == "__main__":
    sys.exit(main())
