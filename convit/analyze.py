"""convit-analyze: pictures and numbers of a ConViT's locality (section 4 of the paper).

    convit-analyze CHECKPOINT [--data-path DIR] [--output-dir DIR] [--log log.txt]
    convit-analyze --model convit_tiny                      # fresh weights, the embedded digits

Input: one of our checkpoints (``{"model": state_dict, "config": {...}}``, written by
``convit-train``), an official/timm one (a raw state dict or ``{"model": ...}``; the architecture is
inferred from the tensor shapes), or ``--model NAME`` with fresh weights. Images come from an
ImageFolder directory (its ``val/`` part if it has one) or, by default, from the embedded digits.
Writes into ``--output-dir``:

- ``attention_maps_layer{L}.png`` (one per GPSA layer): positional, content and mixed attention of
  every head for the ``--query`` patch, over the ``--image-index`` image;
- ``gates.png``: sigmoid(gating_param), layers x heads;
- ``nonlocality.png``: nonlocality per layer and head, averaged over the batch, every layer computed
  from its own input;
- ``attention_centers.png``: each positional head's centre and locality strength, from ``pos_proj``;
- ``training_log.png`` (with ``--log``, or a ``log.txt`` beside the checkpoint): nonlocality and gates
  per layer over epochs;
- ``analysis.json``: every number behind the figures (layer keys are strings).

This module is the command and the analysis it runs (``analyze_model``); the pieces live by role:
the model a checkpoint holds in ``convit.weights`` (``model_from_checkpoint``), the images in
``convit.data`` (``sample_images``, the training code's scan and evaluation transform), the metrics
in ``convit.locality``, the log in ``convit.runs`` (``read_training_log``), the figures in
``convit.plots`` (``write_analysis_figures``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

try:
    from . import plots
except ModuleNotFoundError as _err:  # matplotlib is in the [analysis] extra, not in [train]
    if not (_err.name or "").startswith("matplotlib"):
        raise
    plots = None
from .data import sample_images
from .locality import attention_centers, gpsa_maps, layer_inputs, layer_locality_stats, nonlocality
from .models import MODEL_CONFIGS, ConViT, create_model
from .runs import LOG_NAME, read_training_log
from .weights import model_from_checkpoint

__all__ = ["main", "run", "build_parser", "model_to_analyze", "analyze_model"]


def model_to_analyze(checkpoint=None, model_name=None, overrides=None, gpsa_backend="reference", seed=0):
    """The ConViT to analyse, in eval mode, and a description of where it came from.

    With a ``checkpoint``: the model that fits it, weights loaded (``convit.weights.model_from_checkpoint``:
    the registered ``model_name`` or the one its config names, its saved config, its tensor shapes,
    then ``overrides``, the CLI flags). Without: the registered ``model_name`` with ``overrides``
    and fresh weights drawn after ``torch.manual_seed(seed)``.
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if model_name is not None and model_name not in MODEL_CONFIGS:
        raise ValueError(f"unknown --model {model_name!r}; known models: {', '.join(MODEL_CONFIGS)}")
    torch.manual_seed(seed)
    if checkpoint is not None:
        model, source = model_from_checkpoint(checkpoint, model_name, overrides, gpsa_backend)
    elif model_name is None:
        raise ValueError("give a checkpoint path or --model NAME (fresh weights)")
    else:
        kwargs = dict(overrides, gpsa_backend=gpsa_backend)
        model, source = create_model(model_name, **kwargs), {"model": model_name, "kwargs": kwargs}
    source["fresh_weights"] = checkpoint is None
    source["kwargs"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in source["kwargs"].items()}
    return model.eval(), source


def _keyed(d) -> dict:
    return {str(k): v for k, v in d.items()}


@torch.no_grad()
def analyze_model(model: ConViT, images: torch.Tensor, query=None, image_index: int = 0) -> dict:
    """Every number of the figures, as JSON-ready lists keyed by layer (strings).

    ``query``: (row, col) of the query patch of the attention maps (default: the grid centre);
    ``image_index``: which image of the batch the maps are drawn for. Nonlocality is averaged over
    the whole batch, each layer on its own input (``layer_locality_stats``).
    """
    model.eval()
    rows, cols = model.patch_embed.grid_size
    if query is None:
        query = (rows // 2, cols // 2)
    qr, qc = query
    if not (0 <= qr < rows and 0 <= qc < cols):
        raise ValueError(f"--query ({qr}, {qc}) is outside the {rows} x {cols} patch grid")
    if not 0 <= image_index < images.shape[0]:
        raise ValueError(f"--image-index {image_index} is outside the {images.shape[0]} images")
    stats = layer_locality_stats(model, images)
    inputs = layer_inputs(model, images, gpsa_only=True)
    q_idx = qr * cols + qc
    maps, nl_parts, gates, centers, strengths = {}, {"positional": {}, "content": {}}, {}, {}, {}
    for layer, x in inputs.items():
        attn = model.blocks[layer].attn
        m = gpsa_maps(attn, x)
        maps[str(layer)] = {kind: a[image_index if kind != "positional" else 0, :, q_idx].reshape(-1, rows, cols)
                            .double().tolist() for kind, a in m.items()}
        for kind in nl_parts:
            nl_parts[kind][str(layer)] = nonlocality(m[kind], (rows, cols)).tolist()
        gates[str(layer)] = torch.sigmoid(attn.gating_param.double()).tolist()
        c, _, alpha = attention_centers(attn.pos_proj.weight)
        centers[str(layer)] = c.tolist()
        strengths[str(layer)] = alpha.tolist()
    return {
        "grid_size": [rows, cols],
        "patch_size": list(model.patch_embed.patch_size),
        "local_up_to_layer": model.local_up_to_layer,
        "num_images": images.shape[0],
        "query": [qr, qc],
        "image_index": image_index,
        "nonlocality": _keyed(stats["nonlocality"]),
        "nonlocality_positional": nl_parts["positional"],
        "nonlocality_content": nl_parts["content"],
        "distances": _keyed(stats["distances"]),
        "gating_params": _keyed(stats["gating_params"]),
        "gates": gates,
        "centers": centers,
        "locality_strength": strengths,
        "attention_maps": maps,
    }


# The command ------------------------------------------------------------------------------------

def _size(text):
    parts = [int(p) for p in str(text).replace("x", ",").split(",")]
    if len(parts) not in (1, 2) or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"expected N or H,W (positive); got {text!r}")
    return parts[0] if len(parts) == 1 else tuple(parts)


def _query(text):
    try:
        r, c = (int(p) for p in str(text).split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--query takes ROW,COL of a patch; got {text!r}") from None
    return r, c


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convit-analyze", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", help="our checkpoint, or an official/timm one (raw or under 'model')")
    p.add_argument("--model", default=None, help=f"a registered variant ({', '.join(MODEL_CONFIGS)}); "
                   "fresh weights without a checkpoint")
    p.add_argument("--data-path", "--data_path", dest="data_path", default=None,
                   help="ImageFolder directory (its val/ part if present); default: the embedded digits")
    p.add_argument("--output-dir", "--output_dir", dest="output_dir", default="analysis")
    p.add_argument("--log", default=None, help="training log.txt (default: log.txt beside the checkpoint, if any)")
    p.add_argument("--num-images", type=int, default=32, help="images the nonlocality is averaged over")
    p.add_argument("--image-index", type=int, default=0, help="the image the attention maps are drawn on")
    p.add_argument("--query", type=_query, default=None, help="ROW,COL of the query patch (default: grid centre)")
    p.add_argument("--gpsa-backend", default="reference",
                   help="GPSA backend for the forward pass (the maps themselves are always the reference)")
    p.add_argument("--seed", type=int, default=0, help="seed of fresh weights")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dpi", type=int, default=100)
    g = p.add_argument_group("architecture overrides (default: saved config, checkpoint shapes, --model)")
    g.add_argument("--img-size", "--input-size", "--input_size", dest="img_size", type=_size)
    g.add_argument("--patch-size", dest="patch_size", type=_size)
    g.add_argument("--in-chans", dest="in_chans", type=int)
    g.add_argument("--num-classes", "--nb_classes", dest="num_classes", type=int)
    g.add_argument("--embed-dim", dest="embed_dim", type=int)
    g.add_argument("--depth", type=int)
    g.add_argument("--num-heads", dest="num_heads", type=int)
    g.add_argument("--local_up_to_layer", "--local-up-to-layer", dest="local_up_to_layer", type=int)
    g.add_argument("--locality_strength", "--locality-strength", dest="locality_strength", type=float)
    return p


def run(argv=None) -> dict:
    """The command without the exit status: parse ``argv``, write the outputs, return the numbers."""
    args = build_parser().parse_args(argv)
    if plots is None:
        raise ValueError("matplotlib is not installed; it comes with the [analysis] extra: "
                         'pip install -e ".[analysis]" in the clone (or pip install matplotlib)')
    overrides = {k: getattr(args, k) for k in ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim",
                                               "depth", "num_heads", "local_up_to_layer", "locality_strength")}
    model, source = model_to_analyze(args.checkpoint, args.model, overrides, args.gpsa_backend, args.seed)
    device = torch.device(args.device)
    model.to(device)
    images = sample_images(args.data_path, args.num_images, model.patch_embed.img_size,
                           model.patch_embed.proj.in_channels).to(device)
    print(f"convit-analyze: {source.get('checkpoint') or 'fresh ' + str(args.model)}, "
          f"{images.shape[0]} images {tuple(images.shape[1:])}, grid {model.patch_embed.grid_size}", file=sys.stderr)
    numbers = analyze_model(model, images, args.query, args.image_index)
    numbers["source"] = source
    numbers["images"] = args.data_path or "embedded digits"
    log_path = args.log
    if log_path is None and args.checkpoint is not None:
        beside = os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), LOG_NAME)
        log_path = beside if os.path.isfile(beside) else None
    log = read_training_log(log_path) if log_path else None
    if log is not None:
        numbers["training_log"] = dict(log, path=os.path.abspath(log_path))
    files = plots.write_analysis_figures(numbers, images[args.image_index].cpu(), args.output_dir, log, args.dpi)
    if not numbers["gates"]:
        print("convit-analyze: the model has no GPSA layer: no attention-map, gate or centre figure", file=sys.stderr)
    json_path = os.path.join(args.output_dir, "analysis.json")
    with open(json_path, "w") as f:
        json.dump(numbers, f, indent=1, allow_nan=True)
    files.append(json_path)
    for path in files:
        print(path)
    return numbers


def main(argv=None) -> int:
    """The ``convit-analyze`` console script: 0 on success, 2 with a one-line error for bad input."""
    try:
        run(argv)
    except (ValueError, FileNotFoundError) as err:
        print(f"convit-analyze: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
