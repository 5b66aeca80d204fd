"""Training checkpoints: written atomically, read with ``weights_only=True``.

A checkpoint is a plain dict of tensors and Python primitives::

    {"format": "convit-train/1", "model": state_dict, "optimizer": ..., "scheduler": ...,
     "scaler": ... or None, "model_ema": state_dict or None, "epoch": next epoch to run,
     "step_in_epoch": next batch of that epoch, "global_step": steps done, "config": TrainConfig
     as a dict, "rng": {"torch", "cuda", "python", "numpy"}, "meters": running sums of the epoch,
     "best_acc1": ..., "n_parameters": ...}

``save_checkpoint`` writes a temporary file next to the target, fsyncs it and ``os.replace``s it
over the target, so a crash (even SIGKILL) leaves either the old or the new checkpoint, never a
torn one. ``load_training_checkpoint`` raises ``CheckpointError`` (a ValueError) with the path and
the reason for a missing, truncated or foreign file.
"""
from __future__ import annotations

import os
import random
from typing import Optional

import numpy as np
import torch

from .weights import describe_load_error

__all__ = ["FORMAT", "CheckpointError", "save_checkpoint", "load_training_checkpoint", "resume_path",
           "capture_rng_state", "restore_rng_state"]

FORMAT = "convit-train/1"
CHECKPOINT_NAME = "checkpoint.pth"


class CheckpointError(ValueError):
    pass


def save_checkpoint(path: str, state: dict) -> None:
    """Write ``state`` to ``path`` atomically (temporary file in the same folder + ``os.replace``)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(dict(state, format=FORMAT), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # make the rename itself durable; not every file system lets a folder be opened
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def resume_path(path: str) -> str:
    """``--resume`` accepts a checkpoint file or the output folder holding ``checkpoint.pth``."""
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
        raise CheckpointError(f"checkpoint {path!r} ({size} bytes) is truncated, corrupt or not a torch "
                              f"checkpoint that loads with weights_only=True: {describe_load_error(path, err)}"
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
