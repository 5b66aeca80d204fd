"""Figures of ConViT's locality (matplotlib, Agg backend: no display needed).

Each ``plot_*`` function takes plain numbers (lists, numpy arrays or tensors), returns a
``matplotlib.figure.Figure`` of a fixed size in inches (stated in its docstring, so a saved PNG
has a predictable pixel size), and never touches a model. ``save_figure`` writes a PNG without
cropping (``bbox_inches`` is left alone: the pixel size is exactly ``size_in_inches * dpi``).

1. ``plot_attention_maps``  positional, content and mixed maps of every head of one GPSA layer,
   for one query patch, over the input image.
2. ``plot_gates``           sigmoid(gating_param) as a layers x heads heatmap.
3. ``plot_nonlocality``     nonlocality per layer and head.
4. ``plot_attention_centers`` each positional head's centre and locality strength, on the grid.
5. ``plot_training_log``    nonlocality and gates per layer over the epochs of a training log.
6. ``plot_sample_efficiency`` accuracy against training fraction, per model.

``write_analysis_figures`` draws and saves 1-5 for ``convit-analyze``.
"""
from __future__ import annotations

import math
import os
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Circle, Rectangle  # noqa: E402
from matplotlib.ticker import FuncFormatter, MaxNLocator  # noqa: E402

__all__ = ["save_figure", "plot_attention_maps", "plot_gates", "plot_nonlocality", "plot_attention_centers",
           "plot_training_log", "plot_sample_efficiency", "attention_maps_figsize", "gates_figsize",
           "NONLOCALITY_FIGSIZE", "attention_centers_figsize", "TRAINING_LOG_FIGSIZE", "SAMPLE_EFFICIENCY_FIGSIZE",
           "write_analysis_figures"]

MAP_KINDS = ("positional", "content", "mixed")
NONLOCALITY_FIGSIZE = (7.0, 4.0)
TRAINING_LOG_FIGSIZE = (11.0, 4.0)
SAMPLE_EFFICIENCY_FIGSIZE = (6.0, 4.0)


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def save_figure(fig, path, dpi: int = 100) -> str:
    """Write ``fig`` as a PNG of exactly ``fig.get_size_inches() * dpi`` pixels, close it, return ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    plt.close(fig)
    return str(path)


# 1. Attention maps -------------------------------------------------------------------------------

def attention_maps_figsize(num_heads: int):
    """(width, height) in inches: one 1.6-inch cell per head plus the image column, three rows."""
    return (1.6 * (num_heads + 1), 1.6 * len(MAP_KINDS) + 0.6)


def plot_attention_maps(image, maps: Mapping[str, object], query, layer: int, patch_size=(1, 1)):
    """Attention of every head of one GPSA layer for one query patch, over the input image.

    ``image``: (C, H, W) or (H, W) values (any range; shown min-max scaled, grey if C != 3);
    ``maps``: {"positional"|"content"|"mixed": (heads, rows, cols)} attention of the query to every
    patch; ``query``: (row, col) of the query patch; ``patch_size``: (ph, pw) pixels of a patch.
    Rows of the figure are the three kinds, columns the heads; the first column shows the image
    with the query patch outlined. Size: ``attention_maps_figsize(heads)``.
    """
    img = _np(image)
    if img.ndim == 3:
        img = img.transpose(1, 2, 0) if img.shape[0] == 3 else img.mean(0)
    img = (img - img.min()) / max(img.max() - img.min(), 1e-12)
    arrays = {kind: _np(maps[kind]) for kind in MAP_KINDS}
    heads, rows, cols = arrays["mixed"].shape
    ph, pw = patch_size
    height, width = rows * ph, cols * pw
    qr, qc = query
    fig, axes = plt.subplots(len(MAP_KINDS), heads + 1, figsize=attention_maps_figsize(heads), squeeze=False)
    fig.suptitle(f"layer {layer}: attention of query patch (row {qr}, col {qc})", fontsize=10)
    for r, kind in enumerate(MAP_KINDS):
        ax = axes[r, 0]
        ax.imshow(img, cmap=None if img.ndim == 3 else "gray", extent=(0, width, height, 0))
        ax.add_patch(Rectangle((qc * pw, qr * ph), pw, ph, fill=False, edgecolor="cyan", linewidth=1.5))
        ax.set_ylabel(kind, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        for h in range(heads):
            ax = axes[r, h + 1]
            amap = arrays[kind][h]
            ax.imshow(img, cmap=None if img.ndim == 3 else "gray", extent=(0, width, height, 0))
            ax.imshow(amap, cmap="inferno", alpha=0.65, extent=(0, width, height, 0), interpolation="nearest",
                      vmin=0.0, vmax=max(float(amap.max()), 1e-12))
            ax.add_patch(Rectangle((qc * pw, qr * ph), pw, ph, fill=False, edgecolor="cyan", linewidth=1.0))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"head {h}", fontsize=9)
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.02, top=0.86, wspace=0.05, hspace=0.08)
    return fig


# 2. Gates ------------------------------------------------------------------------------------

def gates_figsize(num_layers: int, num_heads: int):
    """(width, height) in inches: 0.6 inch per head plus margins, 0.45 inch per layer plus margins."""
    return (2.5 + 0.6 * num_heads, 1.5 + 0.45 * num_layers)


def plot_gates(gates: Mapping[int, Sequence[float]]):
    """sigmoid(gating_param) as a heatmap: ``gates`` is {layer: [per head]} of gate values in [0, 1]
    (1 = purely positional, 0 = purely content). Size: ``gates_figsize(layers, heads)``."""
    layers = sorted(gates, key=int)
    values = np.array([_np(gates[layer]) for layer in layers])
    fig, ax = plt.subplots(figsize=gates_figsize(*values.shape))
    im = ax.imshow(values, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    for (i, j), val in np.ndenumerate(values):
        ax.text(j, i, f"{val:.2f}", ha="center", va="center", fontsize=7, color="white" if val < 0.6 else "black")
    ax.set_xticks(range(values.shape[1]))
    ax.set_yticks(range(len(layers)), [str(layer) for layer in layers])
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title("gates sigmoid(gating_param): 1 = positional, 0 = content", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
    fig.subplots_adjust(left=0.15, right=0.95, bottom=0.5 / fig.get_size_inches()[1] + 0.05, top=0.85)
    return fig


# 3. Nonlocality ------------------------------------------------------------------------------

def plot_nonlocality(nonlocality: Mapping[int, Sequence[float]], local_up_to_layer: int | None = None,
                     components: Mapping[str, Mapping[int, Sequence[float]]] | None = None):
    """Nonlocality (attention-weighted mean query-key distance, in patches) per layer and head.

    ``nonlocality``: {layer: [per head]}; one dot per head, the line is the mean over heads.
    ``components``: optional {"positional": {layer: [...]}, "content": {...}} drawn as the means of
    those maps; a dotted line separates GPSA layers from plain attention at ``local_up_to_layer``.
    Size: ``NONLOCALITY_FIGSIZE``.
    """
    fig, ax = plt.subplots(figsize=NONLOCALITY_FIGSIZE)
    layers = sorted(nonlocality, key=int)
    for layer in layers:
        vals = _np(nonlocality[layer])
        ax.scatter(np.full(len(vals), int(layer)), vals, s=14, color="tab:blue", alpha=0.6)
    ax.plot([int(l) for l in layers], [_np(nonlocality[l]).mean() for l in layers], color="tab:blue",
            label="mixed (mean over heads)")
    for (kind, series), color in zip((components or {}).items(), ("tab:orange", "tab:green")):
        ls = sorted(series, key=int)
        ax.plot([int(l) for l in ls], [_np(series[l]).mean() for l in ls], color=color, linestyle="--",
                label=f"{kind} (mean over heads)")
    if local_up_to_layer is not None and 0 < local_up_to_layer < len(layers):
        ax.axvline(local_up_to_layer - 0.5, color="grey", linestyle=":", label="GPSA | plain attention")
    ax.set_xlabel("layer")
    ax.set_ylabel("nonlocality (patches)")
    ax.set_xticks([int(l) for l in layers])
    ax.set_title("nonlocality per layer (dots: heads)", fontsize=10)
    ax.legend(fontsize=8)
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.13, top=0.9)
    return fig


# 4. Attention centres ------------------------------------------------------------------------

def attention_centers_figsize(num_layers: int):
    """(width, height) in inches: up to 5 panels of 2.6 inches a row."""
    ncols = min(num_layers, 5)
    nrows = math.ceil(num_layers / ncols)
    return (2.6 * ncols, 2.6 * nrows + 0.5)


def plot_attention_centers(centers: Mapping[int, Sequence[Sequence[float]]],
                           strengths: Mapping[int, Sequence[float]], grid_size):
    """Where each positional head looks: one panel per GPSA layer.

    ``centers``: {layer: [(dx, dy) per head]} offsets from the query in patches (``dx`` columns to
    the right, ``dy`` rows down; inf/nan where a head has no centre); ``strengths``: {layer: [alpha
    per head]}. The query sits at (0, 0) on the ``grid_size`` patch lattice; each head is a circle
    at its centre with radius 1 / sqrt(2 alpha) (the standard deviation of its Gaussian
    ``exp(-alpha d^2)``), labelled with its index. Size: ``attention_centers_figsize(layers)``.
    """
    layers = sorted(centers, key=int)
    rows, cols = grid_size
    ncols = min(len(layers), 5)
    nrows = math.ceil(len(layers) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=attention_centers_figsize(len(layers)), squeeze=False)
    half_r, half_c = rows / 2, cols / 2
    for ax in axes.flat[len(layers):]:
        ax.axis("off")
    for ax, layer in zip(axes.flat, layers):
        cs, alphas = _np(centers[layer]).reshape(-1, 2), _np(strengths[layer])
        ax.set_xlim(-half_c, half_c)
        ax.set_ylim(half_r, -half_r)  # rows grow downwards, as in the image
        ax.set_aspect("equal")
        ax.set_xticks(np.arange(-math.floor(half_c), math.floor(half_c) + 1))
        ax.set_yticks(np.arange(-math.floor(half_r), math.floor(half_r) + 1))
        ax.tick_params(labelsize=6)
        ax.grid(True, linewidth=0.3)
        ax.plot([0], [0], marker="+", color="black", markersize=10)
        off_grid = []
        for h, ((cx, cy), alpha) in enumerate(zip(cs, alphas)):
            if not (np.isfinite(cx) and np.isfinite(cy) and alpha > 0):
                off_grid.append(f"{h}: no centre")
                continue
            radius = 1.0 / math.sqrt(2.0 * alpha)
            color = plt.cm.tab20(h % 20)
            ax.add_patch(Circle((cx, cy), radius, fill=False, edgecolor=color, linewidth=1.2))
            if abs(cx) <= half_c and abs(cy) <= half_r:
                ax.text(cx, cy, str(h), ha="center", va="center", fontsize=7, color=color)
            else:
                off_grid.append(f"{h}: ({cx:.1f}, {cy:.1f})")
        ax.set_title(f"layer {layer}", fontsize=9)
        if off_grid:
            ax.text(0.02, 0.02, "\n".join(off_grid[:6]), transform=ax.transAxes, fontsize=5, va="bottom")
    fig.suptitle("positional heads: centre (dx, dy) and 1/sqrt(2 alpha) around the query (+)", fontsize=9)
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.05, top=1.0 - 0.5 / fig.get_size_inches()[1],
                        wspace=0.25, hspace=0.3)
    return fig


# 5. Training log -----------------------------------------------------------------------------

def plot_training_log(epochs: Sequence[int], nonlocality: Mapping[int, Sequence[float]],
                      gates: Mapping[int, Sequence[float]]):
    """Nonlocality and gate per layer (mean over heads) over training epochs.

    ``epochs``: E epoch numbers; ``nonlocality``: {layer: (E,) head-mean nonlocality};
    ``gates``: {layer: (E,) head-mean sigmoid(gating_param)}. Size: ``TRAINING_LOG_FIGSIZE``.
    """
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=TRAINING_LOG_FIGSIZE)
    cmap = plt.cm.viridis
    layers = sorted(set(nonlocality) | set(gates), key=int)
    span = max(len(layers) - 1, 1)
    for i, layer in enumerate(layers):  # one colour per layer in both panels
        if layer in nonlocality:
            ax1.plot(epochs, _np(nonlocality[layer]), color=cmap(i / span), marker=".", label=f"layer {layer}")
        if layer in gates:
            ax2.plot(epochs, _np(gates[layer]), color=cmap(i / span), marker=".", label=f"layer {layer}")
    ax1.set_title("nonlocality (mean over heads)", fontsize=10)
    ax1.set_ylabel("patches")
    ax2.set_title("gate sigmoid(gating_param) (mean over heads)", fontsize=10)
    ax2.set_ylim(-0.02, 1.02)
    for ax in (ax1, ax2):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax2.legend(*ax1.get_legend_handles_labels(), fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.subplots_adjust(left=0.06, right=0.86, bottom=0.13, top=0.9, wspace=0.2)
    return fig


# The sample-efficiency study -------------------------------------------------------------------

def plot_sample_efficiency(results: Mapping[str, Mapping[float, Sequence[float]]], title: str = ""):
    """Validation accuracy against training fraction: {label: {fraction: [accuracy per seed]}}.

    Lines through the mean over seeds, a band from min to max, every seed as a dot; log-scaled x.
    Size: ``SAMPLE_EFFICIENCY_FIGSIZE``.
    """
    fig, ax = plt.subplots(figsize=SAMPLE_EFFICIENCY_FIGSIZE)
    for (label, series), color in zip(results.items(), ("tab:blue", "tab:orange", "tab:green", "tab:red")):
        fracs = sorted(series)
        accs = [_np(series[f]) for f in fracs]
        x = np.array(fracs) * 100
        ax.plot(x, [a.mean() for a in accs], color=color, marker="o", label=label)
        ax.fill_between(x, [a.min() for a in accs], [a.max() for a in accs], color=color, alpha=0.2)
        for xi, a in zip(x, accs):
            ax.scatter(np.full(len(a), xi), a, color=color, s=10, alpha=0.6)
    ax.set_xscale("log")
    ax.set_xticks([f * 100 for f in sorted({f for s in results.values() for f in s})])
    ax.get_xaxis().set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}%"))
    ax.set_xlabel("fraction of the training set")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(title or "sample efficiency (mean, min-max band over seeds)", fontsize=9)
    ax.grid(True, linewidth=0.3)
    ax.legend(fontsize=8)
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.13, top=0.9)
    return fig


# convit-analyze's figures ------------------------------------------------------------------------

def write_analysis_figures(numbers: dict, image, output_dir, log: dict | None = None, dpi: int = 100) -> list:
    """Save the PNGs of ``numbers`` (``convit.analyze.analyze_model``'s output) into ``output_dir``
    and return their paths: ``attention_maps_layer{L}.png`` per GPSA layer (drawn over ``image``,
    (C, H, W)), ``gates.png`` and ``attention_centers.png`` when there is a GPSA layer,
    ``nonlocality.png``, and ``training_log.png`` with a ``log`` (``convit.runs.read_training_log``)."""
    os.makedirs(output_dir, exist_ok=True)
    out = []
    rows, cols = numbers["grid_size"]
    for layer, maps in numbers["attention_maps"].items():
        fig = plot_attention_maps(image, maps, numbers["query"], int(layer), numbers["patch_size"])
        out.append(save_figure(fig, os.path.join(output_dir, f"attention_maps_layer{layer}.png"), dpi))
    if numbers["gates"]:
        out.append(save_figure(plot_gates(numbers["gates"]), os.path.join(output_dir, "gates.png"), dpi))
        fig = plot_attention_centers(numbers["centers"], numbers["locality_strength"], (rows, cols))
        out.append(save_figure(fig, os.path.join(output_dir, "attention_centers.png"), dpi))
    fig = plot_nonlocality(numbers["nonlocality"], numbers["local_up_to_layer"],
                           {k: numbers[f"nonlocality_{k}"] for k in ("positional", "content")
                            if numbers[f"nonlocality_{k}"]})
    out.append(save_figure(fig, os.path.join(output_dir, "nonlocality.png"), dpi))
    if log is not None:
        fig = plot_training_log(log["epochs"], log["nonlocality"], log["gates"])
        out.append(save_figure(fig, os.path.join(output_dir, "training_log.png"), dpi))
    return out
