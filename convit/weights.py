"""Official, timm and our own ConViT weights: reading them, loading them into a model, and
building the model a checkpoint holds.

- ``load_checkpoint``: weights from a file into a model you built (``pos_embed`` resized to its grid).
- ``infer_model_kwargs``: the ConViT constructor arguments a state dict's tensor shapes tell.
- ``model_from_checkpoint``: the ConViT that fits a checkpoint (its saved config, then its shapes),
  with the weights loaded.

(Training state, optimizer and all, is ``convit.train_state``.)
"""
from __future__ import annotations

import argparse
import inspect
import math
import os
import re
from typing import Mapping

import torch
import torch.nn.functional as F

from .models import MODEL_CONFIGS, ConViT, create_model

__all__ = ["load_checkpoint", "read_checkpoint", "extract_state_dict", "resize_pos_embed", "describe_load_error",
           "infer_model_kwargs", "saved_config_kwargs", "model_from_checkpoint"]

_CONVIT_ARGS = set(inspect.signature(ConViT.__init__).parameters) - {"self", "norm_layer"}
# Names other configurations use for constructor arguments (the official DeiT args among them).
_ALIASES = {"input_size": "img_size", "nb_classes": "num_classes", "embed-dim": "embed_dim"}


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
    return _load_state_dict(model, sd, path, strict)


def _load_state_dict(model: torch.nn.Module, sd: dict, path, strict: bool) -> dict:
    """``load_checkpoint`` once the file is read: ``sd`` into ``model``, ``path`` naming it in errors."""
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


def infer_model_kwargs(sd: Mapping[str, torch.Tensor]) -> dict:
    """ConViT constructor arguments read off an official-format state dict's shapes.

    Embed dim, input channels and patch size from ``patch_embed.proj.weight``; depth from the
    block indices; ``local_up_to_layer`` from the leading blocks that have ``attn.qk`` (GPSA) rather
    than ``attn.qkv``; heads from ``pos_proj`` (or, with no GPSA block, from the registered variant
    of that width); MLP ratio, qkv bias, classes; the image size from a square ``pos_embed`` grid.
    What cannot be inferred is left out (the caller passes it).
    """
    if "patch_embed.proj.weight" not in sd:
        raise ValueError("the checkpoint has no 'patch_embed.proj.weight': not a ConViT state dict")
    embed_dim, in_chans, ph, pw = sd["patch_embed.proj.weight"].shape
    kw = dict(embed_dim=embed_dim, in_chans=in_chans, patch_size=(ph, pw) if ph != pw else ph)
    blocks = {int(m.group(1)) for k in sd for m in [re.match(r"blocks\.(\d+)\.", k)] if m}
    kw["depth"] = max(blocks) + 1 if blocks else 0
    local = 0
    while f"blocks.{local}.attn.qk.weight" in sd:
        local += 1
    kw["local_up_to_layer"] = local
    if local:
        kw["num_heads"] = sd["blocks.0.attn.pos_proj.weight"].shape[0]
    else:
        match = [c["num_heads"] for c in MODEL_CONFIGS.values() if c["embed_dim"] == embed_dim]
        if match:
            kw["num_heads"] = match[0]
    if "blocks.0.mlp.fc1.weight" in sd:
        kw["mlp_ratio"] = sd["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
    kw["qkv_bias"] = "blocks.0.attn.qk.bias" in sd or "blocks.0.attn.qkv.bias" in sd
    kw["num_classes"] = sd["head.weight"].shape[0] if "head.weight" in sd else 0
    kw["use_pos_embed"] = "pos_embed" in sd
    if "pos_embed" in sd:
        n = sd["pos_embed"].shape[1]
        side = math.isqrt(n)
        if side * side == n:
            kw["img_size"] = (side * ph, side * pw) if ph != pw else side * ph
    return kw


def saved_config_kwargs(config) -> dict:
    """The ConViT constructor arguments inside a saved training config (a dict, ours, or the
    official run's argparse Namespace); official names (``input_size``, ``nb_classes``) mapped to
    ours. The GPSA backend is left out: it is the loader's choice, not the checkpoint's."""
    if isinstance(config, argparse.Namespace):
        config = vars(config)
    if not isinstance(config, Mapping):
        return {}
    out = {}
    for key, val in config.items():
        key = _ALIASES.get(key, key)
        if key in _CONVIT_ARGS and key != "gpsa_backend" and val is not None:
            out[key] = tuple(val) if isinstance(val, list) else val
    return out


def model_from_checkpoint(path, model_name=None, overrides=None, gpsa_backend: str = "reference"):
    """The ConViT that fits the checkpoint at ``path``, its weights loaded (strict); and where each
    constructor argument came from: ``(model, {"checkpoint": abs path, "saved_config": bool,
    "model": registered name or None, "kwargs": {...}})``.

    Architecture, lowest priority first: the registered ``model_name`` (or the one named in the
    checkpoint's saved config), that config's constructor arguments, the shapes of the tensors
    (``infer_model_kwargs``; they are the truth about the weights: the official args' ``embed_dim``,
    for one, is a per-head width), then ``overrides``. With no registered name, ``img_size`` and
    ``num_heads`` must be known: a ValueError names the flags to pass when they are not.
    """
    obj = read_checkpoint(path)
    sd = extract_state_dict(obj, source=repr(str(path)))
    config = obj.get("config", obj.get("args")) if isinstance(obj, Mapping) else None
    kwargs = saved_config_kwargs(config)
    saved_config = bool(kwargs)
    if model_name is None and isinstance(config, (Mapping, argparse.Namespace)):
        name = (vars(config) if isinstance(config, argparse.Namespace) else config).get("model")
        model_name = name if name in MODEL_CONFIGS else None
    kwargs.update(infer_model_kwargs(sd))
    kwargs.update({k: v for k, v in (overrides or {}).items() if v is not None})
    kwargs["gpsa_backend"] = gpsa_backend
    if model_name is not None:
        model = create_model(model_name, **kwargs)
    else:
        missing = {"img_size", "num_heads"} - set(kwargs)
        if missing:
            raise ValueError(f"cannot infer {sorted(missing)} from the checkpoint: pass "
                             + " ".join(f"--{m.replace('_', '-')}" for m in sorted(missing)))
        model = ConViT(**kwargs)
    _load_state_dict(model, sd, path, strict=True)
    return model, {"checkpoint": os.path.abspath(path), "saved_config": saved_config, "model": model_name,
                   "kwargs": kwargs}
