"""Sample efficiency of ConViT on the embedded digits (the paper's Table 2, in miniature).

ConViT (the digits model of ``convit-train``, ``local_up_to_layer`` 5 of 6 blocks GPSA) against the
same network with plain attention everywhere (``local_up_to_layer`` 0), trained on 10/25/50/100 % of
each training class (``--sampling_ratio``), three seeds each. As in the paper, the number of
optimisation steps is held roughly constant: ``epochs = base_epochs / fraction`` (warm-up scaled the
same way); everything else is the digits preset of ``convit-train``. Every run is evaluated once, at
its end, on the same fixed 360-image validation split (a best-over-epochs accuracy would be a
maximum over 10x more evaluations at 10 % than at 100 %, flattering the small fractions).

    python scripts/sample_efficiency.py                       # writes results/sample_efficiency.{csv,png}
    python scripts/sample_efficiency.py --base-epochs 2 --seeds 0 --fractions 0.25 1.0 --out /tmp/se

Runs go to ``--workers`` processes with one torch thread each (2 on a 2-core CPU).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {"ConViT (GPSA in 5 of 6 blocks)": 5, "plain attention (local_up_to_layer 0)": 0}
FIELDS = ["model", "local_up_to_layer", "fraction", "seed", "epochs", "steps", "final_acc1", "time_s", "cpu_s"]


def run_one(job: dict) -> dict:
    """Train one (variant, fraction, seed) with convit.train.train; return a CSV row."""
    import torch

    torch.set_num_threads(1)  # one thread per worker process: the workers share the cores
    import convit.train as ct
    from convit.config import resolve

    # convit.train evaluates (and logs locality) after every epoch. At 10 % that is 10x more
    # evaluations than at 100 % for the same steps, costing more than the training itself; the
    # study needs only the end-of-run accuracy, so the earlier evaluations are skipped here.
    calls = {"n": 0}
    evaluate, locality = ct.evaluate, ct._locality

    def evaluate_last_epoch_only(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] < job["epochs"]:
            return {"loss": float("nan"), "acc1": 0.0, "acc5": 0.0, "images": 0}
        return evaluate(*args, **kwargs)

    ct.evaluate, ct._locality = evaluate_last_epoch_only, lambda model, images: {}
    given = dict(local_up_to_layer=job["local_up_to_layer"], sampling_ratio=job["fraction"], seed=job["seed"],
                 epochs=job["epochs"], warmup_epochs=job["warmup_epochs"], progress=False, device="cpu",
                 gpsa_backend=job["gpsa_backend"])
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the per-epoch lines of 24 runs would drown the table
            summary = ct.train(resolve(given))
    finally:
        ct.evaluate, ct._locality = evaluate, locality
    if calls["n"] != job["epochs"]:
        raise RuntimeError(f"expected {job['epochs']} evaluations (one per epoch), saw {calls['n']}")
    return dict(model=job["model"], local_up_to_layer=job["local_up_to_layer"], fraction=job["fraction"],
                seed=job["seed"], epochs=job["epochs"], steps=summary["global_step"],
                final_acc1=round(summary["final"]["acc1"], 3), time_s=round(time.perf_counter() - start_wall, 1),
                cpu_s=round(time.process_time() - start_cpu, 1))


def _jobs(args) -> list:
    jobs = []
    for fraction in args.fractions:
        epochs = max(1, round(args.base_epochs / fraction))
        for seed in args.seeds:
            for name, local in VARIANTS.items():
                jobs.append(dict(model=name, local_up_to_layer=local, fraction=fraction, seed=seed, epochs=epochs,
                                 warmup_epochs=args.base_warmup_epochs / fraction, gpsa_backend=args.gpsa_backend))
    # Longest first (small fractions: many epochs, each with an evaluation), so the workers finish together.
    return sorted(jobs, key=lambda j: -j["epochs"])


def write_outputs(rows: list, out_prefix: str, title: str) -> tuple:
    from convit.plots import plot_sample_efficiency, save_figure

    rows = sorted(rows, key=lambda r: (r["local_up_to_layer"] == 0, r["fraction"], r["seed"]))
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    csv_path, png_path = out_prefix + ".csv", out_prefix + ".png"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    results = {}
    for r in rows:
        results.setdefault(r["model"], {}).setdefault(float(r["fraction"]), []).append(float(r["final_acc1"]))
    save_figure(plot_sample_efficiency(results, title), png_path, dpi=120)
    return csv_path, png_path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--base-epochs", type=float, default=40,
                   help="epochs at 100 %%; a fraction f trains base_epochs / f epochs (same number of steps)")
    p.add_argument("--base-warmup-epochs", type=float, default=1, help="warm-up epochs at 100 %% (scaled alike)")
    p.add_argument("--workers", type=int, default=2, help="parallel training processes, one thread each")
    p.add_argument("--gpsa-backend", default="auto")
    p.add_argument("--out", default=os.path.join(ROOT, "results", "sample_efficiency"),
                   help="output prefix: writes PREFIX.csv and PREFIX.png")
    args = p.parse_args(argv)
    if any(not 0 < f <= 1 for f in args.fractions):
        p.error(f"--fractions must be in (0, 1]; got {args.fractions}")
    jobs = _jobs(args)
    load_before = os.getloadavg()
    print(f"{len(jobs)} runs on {args.workers} worker(s); load average {load_before[0]:.1f} "
          f"(1 min) on {os.cpu_count()} CPU(s)", flush=True)
    start = time.perf_counter()
    rows = []
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        for row in pool.map(run_one, jobs):
            rows.append(row)
            print(json.dumps(row), flush=True)
    elapsed = time.perf_counter() - start
    load_after = os.getloadavg()
    cpu = sum(r["cpu_s"] for r in rows)
    title = (f"digits, {len(args.seeds)} seed(s), epochs = {args.base_epochs:g} / fraction; "
             f"final val. top-1, mean and min-max")
    csv_path, png_path = write_outputs(rows, args.out, title)
    print(f"done in {elapsed:.0f} s wall ({cpu:.0f} s CPU in the runs); load average before {load_before[0]:.1f}, "
          f"after {load_after[0]:.1f} (1 min), {load_after[2]:.1f} (15 min)")
    print(f"wrote {csv_path} and {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
