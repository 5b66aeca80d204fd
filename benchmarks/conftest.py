"""pytest configuration of the benchmark suite (``pytest benchmarks --benchmark-only``).

Collects ``bench_*.py`` here (the repository's pytest settings only look for ``test_*.py``), shows
every skip reason in the summary, and writes into pytest-benchmark's ``machine_info`` what a
reader of the JSON needs: torch/triton versions, the device, the command, the threads, the load of
the machine and why each skipped case was skipped.
"""
import os
import platform
import shlex
import sys

import pytest
import torch

# Without a GPU, Triton kernels run under its interpreter (as in tests/conftest.py). The variable
# must be set before convit_kernels (and so triton.jit) is imported by the benchmark modules.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Each op shape and each model is compiled once, without dynamic shapes: allow more recompiles of
# the same function than dynamo's default of 8 before it falls back to eager.
import torch._dynamo.config as _dynamo_config  # noqa: E402

for _name in ("recompile_limit", "cache_size_limit"):
    if hasattr(_dynamo_config, _name):
        setattr(_dynamo_config, _name, 64)

_SKIPPED: dict[str, str] = {}
_LOAD_AT_START = os.getloadavg() if hasattr(os, "getloadavg") else None


def pytest_collect_file(file_path, parent):
    # A file named on the command line is collected by pytest itself; don't collect it twice.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_configure(config):
    # Skips are part of the result here ("unavailable, because ..."): always list them.
    chars = getattr(config.option, "reportchars", "") or ""
    if "s" not in chars and "a" not in chars and "A" not in chars:
        config.option.reportchars = chars + "s"


def pytest_runtest_logreport(report):
    if report.skipped and report.when in ("setup", "call"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _SKIPPED[report.nodeid.split("::")[-1]] = reason.removeprefix("Skipped: ")


# The environment variables that cap the ISA of the code a CPU run times: ours (csrc/cpu/gpsa_cpu.h), oneDNN's
# (the brgemm products of the cpu backend), MKL's (torch.mm, the composed baseline) and ATen's own kernels
# (SDPA's flash attention, softmax). Setting all four to AVX2 on an AVX-512 machine emulates an AVX2 CPU.
ISA_ENV = ("CONVIT_KERNELS_CPU_ISA", "CONVIT_KERNELS_CPU_PORTABLE", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS",
           "ATEN_CPU_CAPABILITY")


def cpu_model(machine_info=None) -> str:
    """The CPU's brand string, with its family and model numbers where /proc/cpuinfo has them (a VM's
    brand string can be as vague as "AMD EPYC"; family 25 model 17 says Zen 4)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if not line.strip():
                    break  # the first processor's block is enough
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    brand = (machine_info or {}).get("cpu", {}).get("brand_raw") or fields.get("model name")
    brand = brand or platform.processor() or platform.machine() or "unknown CPU"
    if "cpu family" in fields and "model" in fields:
        brand += f" (family {fields['cpu family']}, model {fields['model']})"
    return brand


def cpu_info(machine_info=None) -> dict:
    """The CPU model, the ISA level of the cpu backend, the levels the CPU supports, ATen's CPU capability
    and the ISA caps set in the environment: recorded in every benchmark JSON (GPU runs too: the host)."""
    info = {"cpu_model": cpu_model(machine_info),
            "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "isa_env": {k: os.environ[k] for k in ISA_ENV if k in os.environ}}
    try:
        import convit_kernels  # noqa: F401 - loads the ops

        info["cpu_isa"] = torch.ops.convit_kernels.cpu_isa()
        info["cpu_isa_levels"] = list(torch.ops.convit_kernels.cpu_isa_levels())
    except Exception as err:  # noqa: BLE001 - the extension is optional; say why it is missing
        info["cpu_isa"] = f"unknown ({type(err).__name__}: {err})"
    return info


def pytest_benchmark_update_machine_info(config, machine_info):
    import convit_bench

    import convit_kernels as ck

    info = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "device": convit_bench.DEVICE,
        "dtype": str(convit_bench.DTYPE).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "command": " ".join(["pytest"] + [shlex.quote(a) for a in config.invocation_params.args]),
        "backend_status": ck.backend_status(convit_bench.DEVICE),
        "memory_method": convit_bench.MEMORY_METHOD,
        "skipped": dict(sorted(_SKIPPED.items())),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as err:  # noqa: BLE001 - reported, not needed
        info["triton"] = f"not importable ({type(err).__name__})"
    if convit_bench.ON_GPU:
        props = torch.cuda.get_device_properties(0)
        info["device_name"] = props.name
        info["device_memory_gb"] = round(props.total_memory / 2**30, 1)
    else:
        info["device_name"] = machine_info.get("cpu", {}).get("brand_raw") or platform.processor() or "CPU"
    info.update(cpu_info(machine_info))
    if _LOAD_AT_START is not None:
        info["load_average_start"] = [round(x, 2) for x in _LOAD_AT_START]
        info["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    info["argv"] = sys.argv
    machine_info["convit"] = info
