"""Training checkpoints: written atomically, read with ``weights_only=True``.

A checkpoint is a plain dict of tensors and Python primitives::

    {"format": "convit-train/1", "model": state_dict, "optimizer": ..., "scheduler": ...,
     "scaler": ... or None, "model_ema": state_dict or None, "epoch": next epoch to run,
     "step_in_epoch": next batch of that epoch, "global_step": steps done, "config": TrainConfig
     as a dict, "rng": {"torch", "cuda", "python", "numpy"}, "meters": running sums of the epoch,
     "best_acc1": ..., "n_parameters": ...}

``save_checkpoint`` writes a temporary file next to the target, fsyncs it and ``os.replace``s it
over the target, so a crash (even SIGKILL) leaves either the old or the new checkpoint, never a
torn one. It also keeps the checkpoint it replaces as the previous one (``checkpoint.prev.pth``,
a hard link renamed into place), so that a checkpoint damaged after it
was written (a copy cut short, a full disk on a file system that lied about fsync) still has a
complete predecessor. ``load_training_checkpoint`` raises ``CheckpointError`` (a ValueError) with
the path and the reason for a missing, truncated or foreign file; ``find_resumable`` picks the
checkpoint ``--resume auto`` continues.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .weights import describe_load_error

__all__ = ["FORMAT", "CHECKPOINT_NAME", "PREVIOUS_NAME", "AUTO", "CheckpointError", "save_checkpoint",
           "previous_path", "remove_stale_temporaries", "load_training_checkpoint", "resume_path", "find_resumable",
           "Resumable", "capture_rng_state", "restore_rng_state"]

FORMAT = "convit-train/1"
CHECKPOINT_NAME = "checkpoint.pth"
PREVIOUS_NAME = "checkpoint.prev.pth"  # the checkpoint before the last one, kept by every save (previous_path)
AUTO = "auto"  # --resume auto


class CheckpointError(ValueError):
    pass


def previous_path(path: str) -> str:
    """Where ``save_checkpoint`` keeps the checkpoint before ``path``: ``checkpoint.prev.pth``."""
    root, ext = os.path.splitext(path)
    return root + ".prev" + ext


def save_checkpoint(path: str, state: dict, keep_previous: bool = True) -> None:
    """Write ``state`` to ``path`` atomically (temporary file in the same folder + ``os.replace``).

    With ``keep_previous``, the file ``path`` holds before this call becomes ``previous_path(path)``
    (replacing it) once the new one is completely written and synced. At every instant ``path`` is
    complete (the old or the new checkpoint) and so is the previous one; only on a file system
    without hard links is there a moment with the previous one alone, which ``find_resumable`` uses.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(dict(state, format=FORMAT), f)
            f.flush()
            os.fsync(f.fileno())
        previous = previous_path(path)
        if keep_previous and os.path.isfile(path):
            link = os.path.join(folder, f".{os.path.basename(previous)}.tmp.{os.getpid()}")
            try:
                if os.path.lexists(link):
                    os.remove(link)
                os.link(path, link)
                os.replace(link, previous)
            except OSError:  # no hard links here: move it instead
                os.replace(path, previous)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _sync_folder(folder)


def _sync_folder(folder: str) -> None:
    try:  # make the renames themselves durable; not every file system lets a folder be opened
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def remove_stale_temporaries(folder: str) -> list:
    """Delete the temporary files of saves that a kill interrupted (``.checkpoint*.tmp.<pid>``);
    returns their names. Call it only while no other process writes checkpoints there."""
    removed = []
    if not os.path.isdir(folder):
        return removed
    for name in sorted(os.listdir(folder)):
        if name.startswith(".checkpoint") and ".tmp." in name:
            try:
                os.remove(os.path.join(folder, name))
                removed.append(name)
            except OSError:
                pass
    return removed


def resume_path(path: str) -> str:
    """``--resume`` accepts a checkpoint file or the output folder holding ``checkpoint.pth``
    (``--resume auto`` is resolved by ``find_resumable`` instead)."""
    if path == AUTO:
        raise ValueError("--resume auto: resolved from --output-dir (find_resumable), not a path")
    if os.path.isdir(path):
        path = os.path.join(path, CHECKPOINT_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume: checkpoint {path!r} does not exist")
    return path


def load_training_checkpoint(path: str, mmap: bool = False) -> dict:
    """Read a checkpoint written by ``save_checkpoint`` with ``torch.load(weights_only=True)``
    (``mmap=True`` maps the tensors instead of reading them: cheap when only the config is wanted)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    size = os.path.getsize(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 - truncated zip, pickle errors, foreign globals, ...
        hint = ""
        previous = os.path.join(os.path.dirname(path), PREVIOUS_NAME)
        if os.path.basename(path) == CHECKPOINT_NAME and os.path.isfile(previous):
            hint = (f"; the checkpoint saved before it, {previous}, may be complete: --resume it, or --resume auto "
                    "with --output-dir to fall back on it")
        raise CheckpointError(f"checkpoint {path!r} ({size} bytes) is truncated, corrupt or not a torch "
                              f"checkpoint that loads with weights_only=True: {describe_load_error(path, err)}{hint}"
                              ) from err
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"checkpoint {path!r} is not a convit-train checkpoint (format {found!r}, expected "
                              f"{FORMAT!r}); to start from official/timm weights use --pretrained")
    missing = [k for k in ("model", "optimizer", "scheduler", "epoch", "step_in_epoch", "global_step", "config")
               if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path!r} lacks {missing}")
    return state


@dataclass
class Resumable:
    """What ``--resume auto`` found in an output folder: ``path`` to continue from (None: start a
    new run) and ``note``, one line for the log saying which."""
    path: Optional[str]
    note: str


def find_resumable(out_dir: str, log_name: str = "log.txt") -> Resumable:
    """The checkpoint ``--resume auto`` continues in ``out_dir``: ``checkpoint.pth`` if it is
    complete, else the previous complete one (``checkpoint.prev.pth``), else none (a new run).

    Raises ``CheckpointError`` when ``checkpoint.pth`` is unusable and no previous one is, and
    ValueError when the folder holds a log but no checkpoint at all: both would otherwise be
    overwritten by a new run. Reads only the files' headers (``mmap``), so it is cheap."""
    ckpt, prev = os.path.join(out_dir, CHECKPOINT_NAME), os.path.join(out_dir, PREVIOUS_NAME)
    bad = None
    if os.path.isfile(ckpt):
        try:
            state = load_training_checkpoint(ckpt, mmap=True)
            return Resumable(ckpt, f"--resume auto: continuing the run in {out_dir} from {ckpt} "
                                   f"({_where(state)})")
        except CheckpointError as err:
            bad = str(err)
    prev_error = None
    if os.path.isfile(prev):
        try:
            state = load_training_checkpoint(prev, mmap=True)
            why = f"{bad}" if bad else f"{ckpt} is missing (a save was interrupted while moving it)"
            return Resumable(prev, f"--resume auto: {why}; continuing from the previous complete checkpoint {prev} "
                                   f"({_where(state)}) instead")
        except CheckpointError as err:
            prev_error = str(err)
    if bad:
        raise CheckpointError(
            f"--resume auto: {bad}; " + (f"the previous one is unusable too ({prev_error}); " if prev_error else
                                         f"and there is no previous checkpoint ({prev}) to continue from; ")
            + "move the file away to start a new run in that folder, or pass --overwrite (the old files are then "
              "moved to a replaced-<time> folder inside it)")
    log = os.path.join(out_dir, log_name)
    if os.path.isfile(log):
        with open(log, "rb") as f:
            lines = sum(1 for line in f if line.strip())
        raise ValueError(
            f"--resume auto: {out_dir} holds {log_name} ({lines} line(s)) but no checkpoint to continue: the run that "
            "wrote it stopped before its first checkpoint, or its checkpoint was removed. A new run would write over "
            "that log, so none is started: pass --overwrite to start one (the log is moved to a replaced-<time> "
            "folder inside it), or another --output-dir")
    return Resumable(None, f"--resume auto: no checkpoint in {out_dir}; starting a new run there")


def _where(state: dict) -> str:
    epochs = (state.get("config") or {}).get("epochs", "?")
    return (f"epoch {state['epoch']} of {epochs}, batch {state['step_in_epoch']}, step {state['global_step']}")


def capture_rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [int(v) if not isinstance(v, np.ndarray) else v.tolist() for v in np.random.get_state()[1:]]}
    state["cuda"] = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return state


def restore_rng_state(state: Optional[dict]) -> None:
    if not state:
        return
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
