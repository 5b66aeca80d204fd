"""Turn pytest-benchmark JSON files into ``benchmarks/RESULTS.md``.

    python benchmarks/report.py                         # every benchmarks/results/*.json
    python benchmarks/report.py run.json -o out.md      # chosen files, another output

One section per run (JSON files of one machine, commit, day, CPU ISA level and ISA caps are merged), newest first:
the device, commit, torch and triton versions, the CPU model and the cpu backend's ISA level, the command, then a table for the op (median time per call and the speed-up
against the official eager formulation, torch.compile of it, the composed baseline, and the time
relative to plain SDPA; "composed" is the composed-PyTorch baseline ``gpsa_composed``, "sdpa" the backend of
that name, "plain_sdpa" SDPA alone) and one for the model (images/s against the official eager model, the
official model compiled and the same network with plain attention), with peak memory, and the
skipped cases with their reasons. A file ``<json name>.notes.md`` next to a JSON is included in
its section (observations that the JSON cannot hold, e.g. other jobs sharing the machine).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
OP_ORDER = ("reference", "reference_compile", "composed", "plain_sdpa", "sdpa", "cpu", "cuda", "triton")
MODEL_ORDER = ("reference", "timm", "plain_attention", "sdpa", "cpu", "cuda", "triton")
# "composed" is the composed-PyTorch baseline (gpsa_composed, plain autograd); "sdpa" the backend of that
# name (SDPA + the batch-shared positional op with its batch-contracted backward); "plain_sdpa" SDPA alone.
OP_LABEL = {"reference": "reference (official eager)", "reference_compile": "torch.compile(reference)",
            "composed": "composed (SDPA + positional matmul)", "plain_sdpa": "plain SDPA (floor)",
            "sdpa": "sdpa backend (SDPA + positional op)"}
MODEL_LABEL = {"reference": "reference (official eager GPSA)", "plain_attention": "plain attention (local_up_to_layer=0)",
               "timm": "timm ConViT"}


def _fmt_ratio(base, value):
    if base is None or value is None or value == 0:
        return ""
    return f"{base / value:.2f}x"


def _fmt_mb(nbytes):
    return "" if nbytes is None else f"{nbytes / 2**20:,.1f}"


def _fmt_ms(seconds):
    return f"{seconds * 1e3:,.3f}" if seconds < 0.01 else f"{seconds * 1e3:,.1f}"


def _op_time(bench):
    """Seconds per call: the CUDA-event median where measured (GPU), else pytest-benchmark's median."""
    ms = bench["extra_info"].get("cuda_event_median_ms")
    return ms / 1e3 if ms is not None else bench["stats"]["median"]


def op_table(benches) -> list[str]:
    cases = defaultdict(dict)
    for b in benches:
        e = b["extra_info"]
        cases[(e["heads"], e["model"], e["batch"], e["mode"])][e["provider"]] = b
    if not cases:
        return []
    has_events = any("cuda_event_median_ms" in b["extra_info"] for b in benches)
    first = benches[0]["extra_info"]
    lines = [
        f"### The GPSA op: N={first['tokens']}, D={first['head_dim']}, {first['dtype']}, strided (B, N, H, D) inputs",
        "",
        "Time: median per call (" + ("CUDA events, L2 flushed before each call; pytest-benchmark's "
                                     "wall-clock median, which includes launch and synchronisation, in brackets"
                                     if has_events else
                                     ("CPU time of the calling thread (--benchmark-timer=time.thread_time: other jobs "
                                      "on the machine do not count)" if "thread_time" in str(
                                          benches[0].get("options", {}).get("timer", "")) else "wall clock")
                                     + ", last-level cache overwritten before each call")
        + "; 'min ms': the fastest round, the least disturbed by other jobs on a shared machine"
        + "). Speed-up = baseline time / this time (> 1: faster than the baseline); "
          "'/ SDPA' = this time / plain SDPA time (the target is <= 1.3). Providers: 'composed' is the "
          "composed-PyTorch baseline (`gpsa_composed`: SDPA + positional matmul, plain autograd); 'sdpa backend' "
          "is `backend=\"sdpa\"` (SDPA + the batch-shared positional op, batch-contracted backward); "
          "'plain SDPA' is `F.scaled_dot_product_attention(q, k, v)` alone.",
        "",
        "| model (H) | B | mode | provider | time ms | min ms | vs official eager | vs compiled official | vs composed | / SDPA | peak MB |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (heads, model, batch, mode) in sorted(cases, key=lambda k: (k[0], k[2], ("fwd", "bwd", "fwd_bwd").index(k[3]))):
        row = cases[(heads, model, batch, mode)]
        t = {p: _op_time(b) for p, b in row.items()}
        for p in sorted(row, key=lambda p: OP_ORDER.index(p) if p in OP_ORDER else len(OP_ORDER)):
            b = row[p]
            time_s = _fmt_ms(t[p])
            if has_events:
                time_s += f" ({_fmt_ms(b['stats']['median'])})"
            sdpa = t.get("plain_sdpa")
            lines.append(
                f"| {model} ({heads}) | {batch} | {mode} | {OP_LABEL.get(p, p)} | {time_s} | {_fmt_ms(b['stats']['min'])} | "
                f"{_fmt_ratio(t.get('reference'), t[p])} | {_fmt_ratio(t.get('reference_compile'), t[p])} | "
                f"{_fmt_ratio(t.get('composed'), t[p])} | {'' if sdpa is None else f'{t[p] / sdpa:.2f}'} | "
                f"{_fmt_mb(b['extra_info'].get('peak_bytes'))} |")
    return lines + [""]


def model_table(benches) -> list[str]:
    cases = defaultdict(dict)
    for b in benches:
        e = b["extra_info"]
        cases[(e["model"], e["mode"])][(e["provider"], e["compiled"])] = b
    if not cases:
        return []
    first = benches[0]["extra_info"]
    lines = [
        f"### The model: batch {first['batch']} at {first['img_size']} px, {first['precision']}",
        "",
        "images/s from the median step time ('min ms': the fastest step). Speed-up = this images/s / the baseline's; "
        "'vs plain attention' compares with the same network with local_up_to_layer=0, eager with eager "
        "and compiled with compiled (the target is >= 0.85). Peak: bytes allocated during one step beyond "
        "what was allocated before it (parameters, optimizer state and inputs excluded).",
        "",
        "| model | mode | provider | torch.compile | images/s | step ms | min ms | vs official eager | vs official compiled "
        "| vs plain attention | peak MB | peak / official eager |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (model, mode) in sorted(cases, key=lambda k: (_model_rank(k[0]), k[1] != "train")):
        row = cases[(model, mode)]
        t = {k: b["stats"]["median"] for k, b in row.items()}
        peak = {k: b["extra_info"].get("peak_bytes") for k, b in row.items()}
        ref_eager, ref_comp = t.get(("reference", "eager")), t.get(("reference", "compile"))
        for key in sorted(row, key=lambda k: (k[1] != "eager", MODEL_ORDER.index(k[0]) if k[0] in MODEL_ORDER else 99)):
            provider, compiled = key
            b = row[key]
            batch = b["extra_info"]["batch"]
            plain = t.get(("plain_attention", compiled))
            peak_ratio = ""
            if peak[key] is not None and peak.get(("reference", "eager")):
                peak_ratio = f"{peak[key] / peak[('reference', 'eager')]:.2f}"
            lines.append(
                f"| {model} | {mode} | {MODEL_LABEL.get(provider, provider)} | {'yes' if compiled == 'compile' else 'no'} | "
                f"{batch / t[key]:,.1f} | {_fmt_ms(t[key])} | {_fmt_ms(b['stats']['min'])} | {_fmt_ratio(ref_eager, t[key])} | "
                f"{_fmt_ratio(ref_comp, t[key])} | {_fmt_ratio(plain, t[key])} | {_fmt_mb(peak[key])} | {peak_ratio} |")
    return lines + [""]


def _model_rank(name):
    return ("convit_tiny", "convit_small", "convit_base").index(name) if name.startswith("convit_") else 9


def skipped_lines(skipped: dict) -> list[str]:
    if not skipped:
        return []
    by_reason = defaultdict(list)
    for case, reason in skipped.items():
        by_reason[reason].append(case)
    lines = ["### Skipped cases", ""]
    for reason, cases in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
        shown = ", ".join(f"`{c}`" for c in cases[:3]) + (f" and {len(cases) - 3} more" if len(cases) > 3 else "")
        lines.append(f"- {len(cases)} case(s), {reason}: {shown}")
    return lines + [""]


def _load(path):
    with open(path) as f:
        data = json.load(f)
    data["_path"] = path
    # Runs recorded before the "sdpa" backend existed (no "sdpa" in their backend status) named plain
    # SDPA "sdpa"; it is "plain_sdpa" now.
    if "sdpa" not in data.get("machine_info", {}).get("convit", {}).get("backend_status", {"sdpa": ""}):
        for b in data.get("benchmarks", []):
            if b.get("extra_info", {}).get("provider") == "sdpa":
                b["extra_info"]["provider"] = "plain_sdpa"
    return data


def _run_key(data):
    """Files from one machine and one commit (e.g. the op and model halves of a GPU run) share a section."""
    info = data.get("machine_info", {}).get("convit", {})
    return (info.get("device"), info.get("device_name"), info.get("torch"),
            data.get("commit_info", {}).get("id"), data.get("datetime", "")[:10],
            # levels, caps, thread counts and timers: separate sections
            info.get("cpu_isa"), tuple(sorted(info.get("isa_env", {}).items())), info.get("threads"),
            str((data.get("benchmarks") or [{}])[0].get("options", {}).get("timer")))


def run_section(runs: list) -> list[str]:
    """One section for JSON files of one run (same machine, commit and day)."""
    runs = sorted(runs, key=lambda d: d.get("datetime", ""))
    data = runs[0]
    mi = data.get("machine_info", {})
    info = mi.get("convit", {})
    commit = data.get("commit_info", {})
    benches = [b for d in runs for b in d.get("benchmarks", [])]
    root = os.path.dirname(HERE)
    files = ", ".join(f"`{os.path.relpath(d['_path'], root)}` ({len(d.get('benchmarks', []))} benchmarks)" for d in runs)
    device = info.get("device_name") or mi.get("cpu", {}).get("brand_raw", "?")
    lines = [f"## {device} ({info.get('device', '?')}), {data.get('datetime', '?')[:16].replace('T', ' ')} UTC", ""]
    dirty = " (working tree had uncommitted changes)" if any(d.get("commit_info", {}).get("dirty") for d in runs) else ""
    lines += [
        f"- Data: {files}",
        f"- Commit: `{commit.get('id', '?')}`{dirty}, branch {commit.get('branch', '?')}",
        f"- torch {info.get('torch', '?')}" + (f" (CUDA {info['torch_cuda']})" if info.get("torch_cuda") else "")
        + f", triton {info.get('triton', '?')}, python {info.get('python', mi.get('python_version', '?'))}, "
          f"pytest-benchmark {data.get('version', '?')}",
        f"- Machine: {mi.get('cpu', {}).get('brand_raw', '?')}, {info.get('cpu_count', '?')} CPUs, "
        f"torch threads {info.get('threads', '?')}" + (f"; {info['device_name']} {info.get('device_memory_gb', '')} GB"
                                                      if info.get("device") == "cuda" else ""),
    ]
    if "cpu_isa" in info:
        caps = ", ".join(f"{k}={v}" for k, v in info.get("isa_env", {}).items()) or "none"
        lines.append(f"- CPU: {info.get('cpu_model', '?')}; cpu backend ISA level **{info['cpu_isa']}** (supported: "
                     f"{', '.join(info.get('cpu_isa_levels', [])) or '?'}); ATen CPU capability "
                     f"{info.get('aten_cpu_capability', '?')}; ISA caps in the environment: {caps}")
    lines += [f"- Command: `{d.get('machine_info', {}).get('convit', {}).get('command', '?')}`" for d in runs]
    lines += [
        "- Backends: " + ", ".join(f"{k}: {v}" for k, v in info.get("backend_status", {}).items()),
        f"- Memory: {info.get('memory_method', '?')}",
    ]
    shared = False
    for d in runs:
        i = d.get("machine_info", {}).get("convit", {})
        load0, load1 = i.get("load_average_start"), i.get("load_average_end")
        if load0 and load1:
            lines.append(f"- Load average (1, 5, 15 min) at start {load0}, at end {load1}")
            shared |= max(load0[0], load1[0]) > 0.75 * (i.get("cpu_count") or 1) + 1
    if shared and info.get("device") == "cpu":
        lines.append(f"- **The CPU was shared**: the load average exceeded the {info.get('cpu_count')} cores, "
                     "so other jobs ran during the measurement; compare ratios within this run only.")
    for d in runs:
        notes = os.path.splitext(d["_path"])[0] + ".notes.md"
        if os.path.exists(notes):
            with open(notes) as f:
                lines += ["", f.read().strip()]
    lines.append("")
    lines += op_table([b for b in benches if b.get("extra_info", {}).get("kind") == "op"])
    lines += model_table([b for b in benches if b.get("extra_info", {}).get("kind") == "model"])
    skipped = {}
    for d in runs:
        skipped.update(d.get("machine_info", {}).get("convit", {}).get("skipped", {}))
    lines += skipped_lines(skipped)
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="*", help="pytest-benchmark JSON files (default: benchmarks/results/*.json)")
    parser.add_argument("-o", "--output", default=os.path.join(HERE, "RESULTS.md"))
    args = parser.parse_args(argv)
    paths = args.json or sorted(glob.glob(os.path.join(HERE, "results", "*.json")))
    if not paths:
        parser.error("no JSON files given and none in benchmarks/results/")

    lines = [
        "# Benchmark results",
        "",
        "Generated by `python benchmarks/report.py` from the pytest-benchmark JSON files listed in each "
        "section (`benchmarks/results/`); do not edit by hand. Reproduce a section with its command. "
        "The floors and predictions behind these figures are in `benchmarks/NOTES.md`.",
        "",
    ]
    groups = defaultdict(list)
    for path in paths:
        data = _load(path)
        groups[_run_key(data)].append(data)
    for runs in sorted(groups.values(), key=lambda r: max(d.get("datetime", "") for d in r), reverse=True):
        lines += run_section(runs)
    with open(args.output, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    print(f"wrote {args.output} from {len(paths)} file(s)")


if __name__ == "__main__":
    main()
