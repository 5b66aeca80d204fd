"""A run's output folder and what resuming it means.

- ``claim_output_dir``: a new run never replaces one already in its ``--output-dir`` (the first
  save would replace its checkpoint, the first epoch append to its log) unless it continues it
  (``--resume`` of that checkpoint) or ``--overwrite`` says to start over; the old files are then
  moved aside, not deleted.
- ``resume_plan``: how a resumed run's config differs from the checkpoint's, and what each
  difference means (refused, schedule rebuilt, or applied as given).
- ``carry_log``: the resumed run's ``log.txt`` up to the checkpoint's epoch, so that no epoch is
  logged twice after a kill between an epoch's log line and its checkpoint.
- ``read_training_log``: the per-epoch locality of a run's ``log.txt``, for ``convit-analyze``.
"""
from __future__ import annotations

import json
import os
import time

import torch

from .config import RUN_FIELDS
from .train_state import CHECKPOINT_NAME, PREVIOUS_NAME, load_training_checkpoint

__all__ = ["LOG_NAME", "ARCH_FIELDS", "ORDER_FIELDS", "SCHEDULE_FIELDS", "claim_output_dir", "describe_run",
           "move_aside", "continues_run_in", "resume_plan", "carry_log", "read_training_log"]

LOG_NAME = "log.txt"

# How resuming treats a flag that differs from the checkpoint's saved config (see ``resume_plan``):
# the architecture must match (the weights would not load); the fields that decide which images
# make up each step cannot change in mid-run; the schedule's fields rebuild the schedule for the
# new values at the checkpoint's position; every other field is applied as given.
ARCH_FIELDS = ("model", "input_size", "nb_classes", "embed_dim", "local_up_to_layer", "locality_strength")
ORDER_FIELDS = ("synthetic", "sampling_ratio", "batch_size", "repeated_aug", "seed", "sched_on_updates")
SCHEDULE_FIELDS = ("epochs", "lr", "unscale_lr", "warmup_epochs", "warmup_lr", "min_lr")


RUN_FILES = (CHECKPOINT_NAME, PREVIOUS_NAME, LOG_NAME)


def describe_run(out_dir: str, found) -> str:
    ckpt = os.path.join(out_dir, CHECKPOINT_NAME)
    if CHECKPOINT_NAME not in found:
        return ", ".join(found)
    try:
        state = load_training_checkpoint(ckpt, mmap=True)
    except ValueError:
        return f"{ckpt}, unreadable"
    epochs = (state.get("config") or {}).get("epochs", "?")
    return (f"{ckpt} at epoch {state['epoch']} of {epochs}, step {state['global_step']}"
            + (f", and {LOG_NAME}" if LOG_NAME in found else ""))


def move_aside(out_dir: str, names) -> str:
    """Move ``out_dir``'s files ``names`` into a new ``out_dir/replaced-<UTC time>/``; returns it."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    dest, n = os.path.join(out_dir, f"replaced-{stamp}"), 1
    while os.path.exists(dest):
        dest, n = os.path.join(out_dir, f"replaced-{stamp}-{n}"), n + 1
    os.makedirs(dest)
    for name in names:
        os.replace(os.path.join(out_dir, name), os.path.join(dest, name))
    return dest


def continues_run_in(out_dir: str, resume_file) -> bool:
    """Whether ``resume_file`` is the checkpoint (or the previous one) of the run in ``out_dir``."""
    return (resume_file is not None and os.path.basename(resume_file) in (CHECKPOINT_NAME, PREVIOUS_NAME)
            and os.path.realpath(os.path.dirname(os.path.abspath(resume_file))) == os.path.realpath(out_dir))


def claim_output_dir(out_dir, resume_file, overwrite: bool, say, is_main: bool = True, agree=None) -> None:
    """Refuse to start a new run over one already in ``out_dir`` (its checkpoint would be replaced
    at the first save, its log appended to), unless this run continues it (``--resume`` of its
    checkpoint or of the previous one) or ``--overwrite`` says to start over: the old files are
    then moved aside.

    Rank 0 (``is_main``) decides; under DDP ``agree(flag)`` sums a 0/1 refusal over the ranks so
    that every rank raises together."""
    if not out_dir:
        return
    refused = None
    if is_main:
        found = [name for name in RUN_FILES if os.path.isfile(os.path.join(out_dir, name))]
        continuing = continues_run_in(out_dir, resume_file)
        if continuing and overwrite:
            refused = (f"--overwrite with --resume {resume_file}: the run to continue is the one --overwrite would "
                       "move aside; give one of them")
        elif found and not continuing:
            if overwrite:
                dest = move_aside(out_dir, found)
                say(f"--overwrite: moved the previous run's {' and '.join(found)} to {dest}")
            else:
                refused = (f"--output-dir {out_dir} already holds a run ({describe_run(out_dir, found)}); pass "
                           f"--resume {out_dir} to continue it, or --overwrite to start a new run there (the old "
                           "files are then moved to a replaced-<time> folder inside it)")
    if agree is not None and agree(1.0 if refused else 0.0) and not refused:
        refused = f"--output-dir {out_dir}: refused by rank 0 (see its message)"
    if refused:
        raise ValueError(refused)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def resume_plan(config, state: dict, world_size: int = 1) -> dict:
    """How this run's config differs from the checkpoint's saved one, and what resuming makes of it.

    Raises ValueError naming the flags for what cannot be honoured: a different architecture (the
    weights would not fit), with ``--eval`` too; for training, a change of the fields that decide
    which images make up each step (``ORDER_FIELDS``) or of the number of processes, and an
    ``--epochs`` or ``--max_steps`` the checkpoint has already passed. Returns
    ``{"schedule": {field: (old, new)}, "other": {field: (old, new)}}``: schedule fields rebuild the
    schedule (``SCHEDULE_FIELDS``, ``--epochs`` among them), the others are applied as given.
    """
    saved = dict(state.get("config") or {})
    now = config.to_dict()
    path = config.resume

    def differs(name):
        return name in saved and saved[name] != now[name]

    arch = [n for n in ARCH_FIELDS if differs(n) and not (n in ("embed_dim", "nb_classes", "input_size")
                                                           and (saved[n] is None or now[n] is None))]
    if arch:
        raise ValueError(f"--resume {path}: the checkpoint's architecture differs from this run's: "
                         + ", ".join(f"{_flag(n)} {now[n]} (checkpoint: {saved[n]})" for n in arch)
                         + "; drop these flags to use the checkpoint's")
    if config.eval:
        return {}
    order = [n for n in ORDER_FIELDS if differs(n)]
    if order:
        raise ValueError(f"--resume {path}: cannot change " + ", ".join(
            f"{_flag(n)} to {now[n]} (checkpoint: {saved[n]})" for n in order)
            + " in the middle of a run: they decide which images make up each step; drop them, or start a new "
              "run (another --output-dir, or --overwrite) to use them")
    if state.get("world_size", world_size) != world_size:
        raise ValueError(f"--resume {path}: the checkpoint was written by {state['world_size']} process(es), this run "
                         f"has {world_size}; the data split and the global batch would change")
    epoch, batch, step = state["epoch"], state["step_in_epoch"], state["global_step"]
    if config.epochs < epoch or (config.epochs == epoch and batch > 0):
        raise ValueError(f"--epochs {config.epochs}: the checkpoint {path} has already trained "
                         + (f"{batch} batches of epoch {epoch}" if batch else f"{epoch} epochs")
                         + f"; give --epochs {epoch + 1} or more to train longer")
    if config.max_steps is not None and config.max_steps <= step:
        raise ValueError(f"--max_steps {config.max_steps}: the checkpoint {path} is already at step {step}")
    plan = {"schedule": {}, "other": {}}
    for name in now:
        if differs(name) and name not in RUN_FIELDS:  # how this invocation runs: not part of the run's record
            plan["schedule" if name in SCHEDULE_FIELDS else "other"][name] = (saved[name], now[name])
    return {k: v for k, v in plan.items() if v}


def carry_log(resume_file: str, out_dir: str, start_epoch: int, say) -> None:
    """Write ``out_dir/log.txt`` as the resumed run's log up to the checkpoint's epoch: a line for
    an epoch at or past it (written just before a kill that came before the checkpoint) is dropped,
    as is a torn last line, so the epoch that runs again is logged once."""
    src, dst = os.path.join(os.path.dirname(resume_file), LOG_NAME), os.path.join(out_dir, LOG_NAME)
    if not os.path.isfile(src):
        return
    with open(src) as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("epoch"), int) and record["epoch"] < start_epoch:
            kept.append(line)
    same = os.path.realpath(src) == os.path.realpath(dst)
    if same and len(kept) == len(lines):
        return
    tmp = f"{dst}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write("".join(line + "\n" for line in kept))
    os.replace(tmp, dst)
    if len(kept) < len(lines):
        say(f"{LOG_NAME}: dropped {len(lines) - len(kept)} line(s) for epochs not in the checkpoint (epoch "
            f"{start_epoch} on, written before the previous run stopped)")


def read_training_log(path) -> dict:
    """Per-epoch, head-mean nonlocality and gates from a training ``log.txt`` (one JSON object a line).

    Lines with ``nonlocality`` and ``gating_params`` ({layer: [per head]}) are used, the others
    (a resumed run's header, say) skipped; ``epoch`` defaults to the line's rank. Returns
    ``{"epochs": [...], "nonlocality": {layer: [...]}, "gates": {layer: [...]}}`` with
    gates = sigmoid(gating_param); a layer missing from an epoch's line has NaN there.
    """
    entries = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno} is not a JSON object: {err}") from err
            if isinstance(entry, dict) and "nonlocality" in entry and "gating_params" in entry:
                entries.append(entry)
    if not entries:
        raise ValueError(f"{path} has no line with 'nonlocality' and 'gating_params': not a ConViT training log")

    def head_mean(values, squash=False):
        t = torch.as_tensor(values, dtype=torch.float64)
        return (torch.sigmoid(t) if squash else t).mean().item()

    def per_layer(field, squash=False):
        layers = sorted({k for e in entries for k in e[field]}, key=int)
        return {k: [head_mean(e[field][k], squash) if k in e[field] else float("nan") for e in entries]
                for k in layers}

    return {"epochs": [e.get("epoch", i) for i, e in enumerate(entries)],
            "nonlocality": per_layer("nonlocality"), "gates": per_layer("gating_params", squash=True)}
