"""Loading official, timm and our own ConViT weights."""
from __future__ import annotations

import argparse
import math
import os
from typing import Mapping

import torch
import torch.nn.functional as F

__all__ = ["load_checkpoint", "read_checkpoint", "extract_state_dict", "resize_pos_embed", "describe_load_error"]


def resize_pos_embed(pos_embed: torch.Tensor, old_grid, new_grid) -> torch.Tensor:
    """Bicubic interpolation of a (1, rows * cols, C) patch position embedding to a new grid."""
    (r0, c0), (r1, c1) = old_grid, new_grid
    C = pos_embed.shape[-1]
    grid = pos_embed.reshape(1, r0, c0, C).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(r1, c1), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, r1 * c1, C).to(pos_embed.dtype)


def extract_state_dict(obj, source="checkpoint") -> dict:
    """The state dict inside a loaded checkpoint: a raw state dict, or one under "model"/"state_dict"."""
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "model_state"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{source} is not a model checkpoint: expected a state dict of tensors, "
                         f"or a dict holding one under 'model'; got {type(obj).__name__}")
    sd = dict(obj)
    if all(k.startswith("module.") for k in sd):  # saved from DistributedDataParallel
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def describe_load_error(path, err: BaseException) -> str:
    """Why ``torch.load(path)`` failed, in one line: the file's kind when it is not one torch writes
    (a zip archive, or a pickle for the legacy format), else the error with its type."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        head = b""
    if not head:
        return "the file is empty"
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        return (f"it is not a torch checkpoint: torch.save writes a zip archive (or a pickle, in the legacy "
                f"format), this file starts with {head!r}")
    text = " ".join(str(err).split())
    if len(text) > 300:
        text = text[:300] + "..."
    return f"{type(err).__name__}: {text}"


def read_checkpoint(path) -> object:
    """``torch.load(path, weights_only=True)`` on the CPU, with errors that name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint path {str(path)!r} does not exist or is not a file")
    try:
        # Official checkpoints may carry the argparse Namespace of their run: plain data, allowed.
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch.load raises many types on a foreign file
        raise ValueError(f"{str(path)!r} could not be read as a torch checkpoint (weights_only=True): "
                         f"{describe_load_error(path, err)}") from err


def load_checkpoint(model: torch.nn.Module, path, strict: bool = True) -> dict:
    """Load official/timm/our weights from ``path`` into ``model``; return the state dict used.

    Accepts a raw state dict or ``{"model": state_dict, ...}``; reads with
    ``torch.load(weights_only=True)``. A ``pos_embed`` saved for another patch grid (fine-tuning
    at 384 px, for instance) is interpolated bicubically to the model's grid. A file that is not a
    checkpoint, or does not fit the model, raises ValueError listing the keys and shapes that differ.
    """
    sd = extract_state_dict(read_checkpoint(path), source=repr(str(path)))
    own = model.state_dict()
    old, new = sd.get("pos_embed"), own.get("pos_embed")
    if old is not None and new is not None and old.dim() == 3 and old.shape[-1] == new.shape[-1] \
            and old.shape[1] != new.shape[1]:
        side = math.isqrt(old.shape[1])
        if side * side != old.shape[1]:
            raise ValueError(f"pos_embed of shape {tuple(old.shape)} cannot be resized to {tuple(new.shape)}: "
                             "the checkpoint's patch grid is not square, so its (rows, cols) is unknown")
        sd["pos_embed"] = resize_pos_embed(old, (side, side), model.patch_embed.grid_size)
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    mismatched = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sorted(set(sd) & set(own)) if sd[k].shape != own[k].shape]
    if mismatched or (strict and (missing or unexpected)):
        parts = []
        if missing:
            parts.append(f"missing keys: {missing}")
        if unexpected:
            parts.append(f"unexpected keys: {unexpected}")
        if mismatched:
            parts.append(f"shape mismatches: {mismatched}")
        raise ValueError(f"checkpoint {str(path)!r} does not fit the model; " + "; ".join(parts))
    model.load_state_dict(sd, strict=strict)
    return sd
