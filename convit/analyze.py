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
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import re
import sys
from typing import Mapping

import torch

from convit_kernels.reference import gpsa_attention_probs

try:
    from . import plots
except ModuleNotFoundError as _err:  # matplotlib is in the [analysis] extra, not in [train]
    if not (_err.name or "").startswith("matplotlib"):
        raise
    plots = None
from .checkpoint import extract_state_dict, load_checkpoint, read_checkpoint
from .locality import attention_centers, layer_inputs, layer_locality_stats, nonlocality
from .models import GPSA, MODEL_CONFIGS, ConViT, create_model

__all__ = ["main", "run", "build_parser", "infer_model_kwargs", "build_model", "load_images", "gpsa_maps",
           "analyze_model", "read_training_log", "write_figures"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_CONVIT_ARGS = set(inspect.signature(ConViT.__init__).parameters) - {"self", "norm_layer"}
# Names other configurations use for constructor arguments (the official DeiT args among them).
_ALIASES = {"input_size": "img_size", "nb_classes": "num_classes", "embed-dim": "embed_dim"}


# The model ------------------------------------------------------------------------------------

def infer_model_kwargs(sd: Mapping[str, torch.Tensor]) -> dict:
    """ConViT constructor arguments read off an official-format state dict's shapes.

    Embed dim, input channels and patch size from ``patch_embed.proj.weight``; depth from the
    block indices; ``local_up_to_layer`` from the leading blocks that have ``attn.qk`` (GPSA) rather
    than ``attn.qkv``; heads from ``pos_proj`` (or, with no GPSA block, from the registered variant
    of that width); MLP ratio, qkv bias, classes; the image size from a square ``pos_embed`` grid.
    What cannot be inferred is left out (pass it as a flag).
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


def _config_kwargs(config) -> dict:
    """The constructor arguments inside a saved training config (a dict or an argparse Namespace)."""
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


def build_model(checkpoint=None, model_name=None, overrides=None, gpsa_backend="reference", seed=0):
    """The ConViT to analyse and a description of where it came from.

    Architecture, lowest priority first: the registered ``model_name`` (or the one named in the
    checkpoint's config), the checkpoint's saved config, the shapes of its tensors, then
    ``overrides`` (the CLI flags). Weights from ``checkpoint`` (through ``load_checkpoint``,
    strict) or fresh with ``torch.manual_seed(seed)``.
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    kwargs, source = {}, {}
    if checkpoint is not None:
        obj = read_checkpoint(checkpoint)
        sd = extract_state_dict(obj, source=repr(str(checkpoint)))
        config = obj.get("config", obj.get("args")) if isinstance(obj, Mapping) else None
        cfg_kwargs = _config_kwargs(config)
        if model_name is None and isinstance(config, (Mapping, argparse.Namespace)):
            name = (vars(config) if isinstance(config, argparse.Namespace) else config).get("model")
            model_name = name if name in MODEL_CONFIGS else None
        # The shapes are the truth about the weights (the official args' embed_dim, for one, is a
        # per-head width); the config fills in what shapes cannot say (a non-square image size).
        kwargs.update(cfg_kwargs)
        kwargs.update(infer_model_kwargs(sd))
        source = {"checkpoint": os.path.abspath(checkpoint), "saved_config": bool(cfg_kwargs)}
    elif model_name is None:
        raise ValueError("give a checkpoint path or --model NAME (fresh weights)")
    kwargs.update(overrides)
    kwargs["gpsa_backend"] = gpsa_backend
    torch.manual_seed(seed)
    if model_name is not None:
        if model_name not in MODEL_CONFIGS:
            raise ValueError(f"unknown --model {model_name!r}; known models: {', '.join(MODEL_CONFIGS)}")
        model = create_model(model_name, **kwargs)
    else:
        missing = {"img_size", "num_heads"} - set(kwargs)
        if missing:
            raise ValueError(f"cannot infer {sorted(missing)} from the checkpoint: pass "
                             + " ".join(f"--{m.replace('_', '-')}" for m in sorted(missing)))
        model = ConViT(**kwargs)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, strict=True)
    source.update(model=model_name, fresh_weights=checkpoint is None,
                  kwargs={k: (list(v) if isinstance(v, tuple) else v) for k, v in kwargs.items()})
    return model.eval(), source


# Images -----------------------------------------------------------------------------------------

def _digits(num_images: int):
    """Validation digits, normalised as the training code normalises them (convit.data's fixed split
    and training-set mean/std); scikit-learn's last images scaled to [0, 1] if convit.data is absent."""
    try:
        from .data import load_digits_split
    except ImportError:
        load_digits_split = None
    if load_digits_split is not None:
        x_train, _, x_val, _ = load_digits_split()
        return (x_val[:num_images] - x_train.mean()) / x_train.std()
    from sklearn.datasets import load_digits

    x = torch.from_numpy(load_digits().images).float().div(16.0)  # 8x8 grey, values 0..16
    return x[-num_images:].unsqueeze(1)


def _image_folder(path, num_images: int, img_size, in_chans: int):
    from PIL import Image

    root = os.path.join(path, "val") if os.path.isdir(os.path.join(path, "val")) else path
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--data-path {str(path)!r} is not a directory")
    files = []
    for cls in sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))):
        folder = os.path.join(root, cls)
        files += [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise ValueError(f"--data-path {str(path)!r}: no images found in {root}/<class>/ folders")
    step = max(len(files) // num_images, 1)  # spread the picks over the classes
    picks = files[::step][:num_images]
    h, w = img_size
    out = []
    for f in picks:
        with Image.open(f) as im:
            im = im.convert("RGB" if in_chans == 3 else "L")
            # The evaluation transform: resize the shorter side to size / 0.875, centre crop.
            scale = max(h, w) / 0.875 / min(im.size)
            im = im.resize((max(round(im.size[0] * scale), w), max(round(im.size[1] * scale), h)), Image.BICUBIC)
            left, top = (im.size[0] - w) // 2, (im.size[1] - h) // 2
            im = im.crop((left, top, left + w, top + h))
            t = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).float().div(255.0)
            out.append(t.view(h, w, -1).permute(2, 0, 1))
    x = torch.stack(out)
    if x.shape[1] == 3:
        x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return x


def load_images(model: ConViT, data_path=None, num_images: int = 32) -> torch.Tensor:
    """(B, in_chans, H, W) images sized for ``model``: from an ImageFolder or the embedded digits.

    Grey images are repeated to 3 channels (and colour ones averaged to 1) when the model needs it,
    and resized bilinearly to the model's input size.
    """
    if num_images < 1:
        raise ValueError(f"--num-images must be >= 1; got {num_images}")
    in_chans = model.patch_embed.proj.in_channels
    img_size = model.patch_embed.img_size
    x = _digits(num_images) if data_path is None else _image_folder(data_path, num_images, img_size, in_chans)
    if x.shape[1] != in_chans:
        if x.shape[1] == 1:
            x = x.expand(-1, in_chans, -1, -1).contiguous()
        elif in_chans == 1:
            x = x.mean(1, keepdim=True)
        else:
            raise ValueError(f"images have {x.shape[1]} channels; the model takes {in_chans}")
    if tuple(x.shape[-2:]) != tuple(img_size):
        x = torch.nn.functional.interpolate(x, size=img_size, mode="bilinear", align_corners=False)
    return x


# The analysis -----------------------------------------------------------------------------------

def gpsa_maps(attn: GPSA, x: torch.Tensor) -> dict:
    """Attention maps of a GPSA layer on its input ``x`` (B, N, C): {"positional": (1, H, N, N)
    (it does not depend on the input), "content": (B, H, N, N), "mixed": (B, H, N, N)}.

    All three come from the reference ``gpsa_attention_probs``: the gate at +inf gives the purely
    positional softmax, at -inf the purely content one, and the layer's own gate the mixture.
    """
    q, k, _ = attn._qkv(x)
    grid = attn._grid(x.shape[1])
    w, b, g = attn.pos_proj.weight, attn.pos_proj.bias, attn.gating_param
    inf = torch.full_like(g, math.inf)
    return {"positional": gpsa_attention_probs(q[:1], k[:1], w, b, inf, grid, attn.scale),  # batch-invariant
            "content": gpsa_attention_probs(q, k, w, b, -inf, grid, attn.scale),
            "mixed": gpsa_attention_probs(q, k, w, b, g, grid, attn.scale)}


def _keyed(d: Mapping) -> dict:
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


def read_training_log(path) -> dict:
    """Per-epoch, head-mean nonlocality and gates from a training ``log.txt`` (one JSON object a line).

    Lines with ``nonlocality`` and ``gating_params`` ({layer: [per head]}) are used, the others
    (a resumed run's header, say) skipped; ``epoch`` defaults to the line's rank. Returns
    ``{"epochs": [...], "nonlocality": {layer: [...]}, "gates": {layer: [...]}}`` with
    gates = sigmoid(gating_param).
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

    def head_mean(v):
        t = torch.as_tensor(v, dtype=torch.float64)
        return t.mean().item()

    epochs = [e.get("epoch", i) for i, e in enumerate(entries)]
    nl_layers = sorted({k for e in entries for k in e["nonlocality"]}, key=int)
    g_layers = sorted({k for e in entries for k in e["gating_params"]}, key=int)
    nan = float("nan")
    return {
        "epochs": epochs,
        "nonlocality": {k: [head_mean(e["nonlocality"][k]) if k in e["nonlocality"] else nan for e in entries]
                        for k in nl_layers},
        "gates": {k: [torch.sigmoid(torch.as_tensor(e["gating_params"][k], dtype=torch.float64)).mean().item()
                      if k in e["gating_params"] else nan for e in entries] for k in g_layers},
    }


def write_figures(numbers: dict, image: torch.Tensor | None, output_dir, log: dict | None = None, dpi: int = 100):
    """The PNGs of ``numbers`` (from ``analyze_model``) and ``log`` (``read_training_log``); returns their paths."""
    os.makedirs(output_dir, exist_ok=True)
    out = []
    rows, cols = numbers["grid_size"]
    for layer, maps in numbers["attention_maps"].items():
        fig = plots.plot_attention_maps(image, maps, numbers["query"], int(layer), numbers["patch_size"])
        out.append(plots.save_figure(fig, os.path.join(output_dir, f"attention_maps_layer{layer}.png"), dpi))
    if numbers["gates"]:
        out.append(plots.save_figure(plots.plot_gates(numbers["gates"]), os.path.join(output_dir, "gates.png"), dpi))
        fig = plots.plot_attention_centers(numbers["centers"], numbers["locality_strength"], (rows, cols))
        out.append(plots.save_figure(fig, os.path.join(output_dir, "attention_centers.png"), dpi))
    fig = plots.plot_nonlocality(numbers["nonlocality"], numbers["local_up_to_layer"],
                                 {k: numbers[f"nonlocality_{k}"] for k in ("positional", "content")
                                  if numbers[f"nonlocality_{k}"]})
    out.append(plots.save_figure(fig, os.path.join(output_dir, "nonlocality.png"), dpi))
    if log is not None:
        fig = plots.plot_training_log(log["epochs"], log["nonlocality"], log["gates"])
        out.append(plots.save_figure(fig, os.path.join(output_dir, "training_log.png"), dpi))
    return out


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
    model, source = build_model(args.checkpoint, args.model, overrides, args.gpsa_backend, args.seed)
    device = torch.device(args.device)
    model.to(device)
    images = load_images(model, args.data_path, args.num_images).to(device)
    print(f"convit-analyze: {source.get('checkpoint') or 'fresh ' + str(args.model)}, "
          f"{images.shape[0]} images {tuple(images.shape[1:])}, grid {model.patch_embed.grid_size}", file=sys.stderr)
    numbers = analyze_model(model, images, args.query, args.image_index)
    numbers["source"] = source
    numbers["images"] = args.data_path or "embedded digits"
    log_path = args.log
    if log_path is None and args.checkpoint is not None:
        beside = os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "log.txt")
        log_path = beside if os.path.isfile(beside) else None
    log = read_training_log(log_path) if log_path else None
    if log is not None:
        numbers["training_log"] = dict(log, path=os.path.abspath(log_path))
    files = write_figures(numbers, images[args.image_index].cpu(), args.output_dir, log, args.dpi)
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
