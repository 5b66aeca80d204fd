"""Locality analysis: the metrics on hand-built maps, the figures, and the convit-analyze CLI."""
import argparse
import json
import math
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from convit import plots
from convit.analyze import main, model_to_analyze, run
from convit.locality import attention_centers, gpsa_maps, nonlocality
from convit.models import GPSA, ConViT
from convit.runs import read_training_log
from convit.weights import infer_model_kwargs

# Exact arithmetic on a handful of float64 numbers: only rounding error separates the two sides.
EXACT = dict(rtol=1e-12, atol=1e-12)


# The metrics on tiny hand-built attention maps ------------------------------------------------------

def test_nonlocality_of_hand_built_maps():
    # A 1 x 3 grid. Head 0 attends uniformly: query 0 sees distances (0, 1, 2), query 1 (1, 0, 1),
    # query 2 (2, 1, 0), so the mean is (3/3 + 2/3 + 3/3) / 3 = 8/9. Head 1 attends only to itself: 0.
    uniform = torch.full((3, 3), 1 / 3, dtype=torch.float64)
    attn = torch.stack([uniform, torch.eye(3, dtype=torch.float64)])
    torch.testing.assert_close(nonlocality(attn, (1, 3)), torch.tensor([8 / 9, 0.0], dtype=torch.float64), **EXACT)
    # A 2 x 2 grid, every query looking at the diagonally opposite patch: sqrt(2), batch-averaged with
    # a batch element that looks half at itself, half at its horizontal neighbour: 1/2.
    opposite = torch.tensor([[0, 0, 0, 1], [0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.float64)
    half = 0.5 * torch.eye(4, dtype=torch.float64) + 0.5 * torch.tensor(
        [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]], dtype=torch.float64)
    batch = torch.stack([opposite, half]).unsqueeze(1)  # (B=2, H=1, 4, 4)
    torch.testing.assert_close(nonlocality(batch, (2, 2)),
                               torch.tensor([(math.sqrt(2) + 0.5) / 2], dtype=torch.float64), **EXACT)


def test_attention_centers_by_hand():
    # w = alpha (2 cx, 2 cy, -1): head 0 centred at (1, -1) with alpha 2, head 1 at the query with
    # alpha 0.5, head 2 has w2 > 0 (it prefers far patches): no centre.
    w = torch.tensor([[4.0, -4.0, -2.0], [0.0, 0.0, -0.5], [1.0, 0.0, 1.0]])
    centers, dist, alpha = attention_centers(w)
    torch.testing.assert_close(centers[:2], torch.tensor([[1.0, -1.0], [0.0, 0.0]], dtype=torch.float64), **EXACT)
    torch.testing.assert_close(dist[:2], torch.tensor([math.sqrt(2), 0.0], dtype=torch.float64), **EXACT)
    torch.testing.assert_close(alpha, torch.tensor([2.0, 0.5, -1.0], dtype=torch.float64), **EXACT)
    assert math.isinf(dist[2])


def test_gpsa_maps_split_positional_and_content():
    # A 1 x 3 grid, one head with pos_proj w = (0, 0, -1): positional logit -d^2, so query 0 gives
    # softmax(0, -1, -4) whatever the input. Content is softmax(q k^T / sqrt(D)); mixed their blend.
    torch.manual_seed(0)
    attn = GPSA(dim=4, num_heads=1, grid_size=(1, 3)).double()
    with torch.no_grad():
        attn.pos_proj.weight.copy_(torch.tensor([[0.0, 0.0, -1.0]]))
        attn.pos_proj.bias.fill_(0.7)  # cancels in the softmax
        attn.gating_param.fill_(0.3)
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    with torch.no_grad():
        maps = gpsa_maps(attn, x)
        q, k = attn.qk(x).reshape(2, 3, 2, 4).unbind(2)
    e = torch.exp(torch.tensor([0.0, -1.0, -4.0], dtype=torch.float64))
    torch.testing.assert_close(maps["positional"][0, 0, 0], e / e.sum(), **EXACT)
    torch.testing.assert_close(maps["positional"][0, 0, 1], torch.tensor([math.e ** -1, 1, math.e ** -1],
                                                                         dtype=torch.float64) / (1 + 2 / math.e), **EXACT)
    content = (q @ k.transpose(-2, -1) / 2.0).softmax(-1)  # sqrt(D) = 2
    torch.testing.assert_close(maps["content"][:, 0], content, **EXACT)
    s = 1 / (1 + math.exp(-0.3))
    torch.testing.assert_close(maps["mixed"][:, 0], (1 - s) * content + s * maps["positional"][:, 0], **EXACT)


def test_read_training_log(tmp_path):
    # Two epochs; layer 0 is GPSA (gating 0 -> gate 0.5; gating +-ln 3 -> gates 3/4 and 1/4, mean 1/2),
    # layer 1 plain attention (nonlocality only). Layer keys are strings after JSON.
    lines = [
        {"epoch": 0, "train_loss": 2.0, "nonlocality": {"0": [1.0, 3.0], "1": [4.0, 4.0]},
         "distances": {"0": [1.0, 1.0]}, "gating_params": {"0": [0.0, 0.0]}},
        {"epoch": 1, "train_loss": 1.5, "nonlocality": {"0": [2.0, 3.0], "1": [5.0, 6.0]},
         "distances": {"0": [1.5, 1.0]}, "gating_params": {"0": [math.log(3), -math.log(3)]}},
    ]
    path = tmp_path / "log.txt"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    log = read_training_log(path)
    assert log["epochs"] == [0, 1]
    assert log["nonlocality"] == {"0": [2.0, 2.5], "1": [4.0, 5.5]}
    np.testing.assert_allclose(log["gates"]["0"], [0.5, 0.5], rtol=1e-12)
    bad = tmp_path / "bad.txt"
    bad.write_text('{"epoch": 0, "train_loss": 1.0}\n')
    with pytest.raises(ValueError, match="not a ConViT training log"):
        read_training_log(bad)


# The figures -------------------------------------------------------------------------------------

DPI = 50


def _check_png(path, size):
    with Image.open(path) as im:
        assert im.size == size, f"{path}: {im.size} pixels, expected {size}"
        pixels = np.asarray(im.convert("RGB"), dtype=np.float64)
    # Non-empty: something other than the white background was drawn, in more than a few colours.
    assert (pixels < 250).any(axis=-1).mean() > 0.01, f"{path} is (almost) blank"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 8, f"{path} has almost no content"


def test_each_figure_has_its_size_and_content(tmp_path):
    torch.manual_seed(0)
    heads, rows, cols = 2, 3, 4
    maps = {k: torch.rand(heads, rows, cols).softmax(-1) for k in ("positional", "content", "mixed")}
    image = torch.rand(1, 6, 8)
    # Sizes (inches) as the docstrings state them; pixels = inches * DPI.
    fig = plots.plot_attention_maps(image, maps, (1, 2), layer=0, patch_size=(2, 2))
    _check_png(plots.save_figure(fig, tmp_path / "maps.png", DPI), (240, 270))  # (1.6 * 3, 1.6 * 3 + 0.6)
    fig = plots.plot_gates({0: [0.1, 0.9], 1: [0.5, 0.7]})
    _check_png(plots.save_figure(fig, tmp_path / "gates.png", DPI), (185, 120))  # (2.5 + 1.2, 1.5 + 0.9)
    fig = plots.plot_nonlocality({0: [1.0, 2.0], 1: [2.5, 3.0], 2: [3.5, 3.6]}, local_up_to_layer=2,
                                 components={"positional": {0: [0.9, 1.0], 1: [1.0, 1.1]}})
    _check_png(plots.save_figure(fig, tmp_path / "nl.png", DPI), (350, 200))  # (7, 4)
    fig = plots.plot_attention_centers({0: [[1.0, -1.0], [0.0, 0.0]], 1: [[-0.5, 0.5], [math.inf, math.inf]]},
                                       {0: [2.0, 0.5], 1: [1.0, -1.0]}, (rows, cols))
    _check_png(plots.save_figure(fig, tmp_path / "centers.png", DPI), (260, 155))  # (2.6 * 2, 2.6 + 0.5)
    fig = plots.plot_training_log([0, 1, 2], {"0": [1.0, 1.2, 1.5], "1": [2.0, 2.0, 2.1]}, {"0": [0.7, 0.6, 0.4]})
    _check_png(plots.save_figure(fig, tmp_path / "log.png", DPI), (550, 200))  # (11, 4)
    fig = plots.plot_sample_efficiency({"ConViT": {0.1: [80.0, 82.0], 1.0: [97.0, 98.0]},
                                        "plain": {0.1: [70.0, 75.0], 1.0: [96.0, 97.0]}})
    _check_png(plots.save_figure(fig, tmp_path / "se.png", DPI), (300, 200))  # (6, 4)


# The CLI -----------------------------------------------------------------------------------------

TINY = dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=16, depth=3, num_heads=4,
            mlp_ratio=2.0, qkv_bias=True, local_up_to_layer=2, gpsa_backend="reference")


def _tiny_convit(**kw):
    torch.manual_seed(1)
    model = ConViT(**{**TINY, **kw})
    with torch.no_grad():  # trained-looking gates, distinct per head, so a mix-up of heads would show
        for i, blk in enumerate(model.blocks[:model.local_up_to_layer]):
            blk.attn.gating_param.copy_(torch.linspace(-1.0, 1.0, 4) + i)
    return model


def _expected_pngs(out, layers):
    names = [f"attention_maps_layer{i}.png" for i in range(layers)] + ["gates.png", "attention_centers.png",
                                                                        "nonlocality.png"]
    return [os.path.join(out, n) for n in names]


def test_cli_on_an_official_format_checkpoint(tmp_path):
    model = _tiny_convit()
    ckpt = tmp_path / "ckpt" / "checkpoint.pth"
    ckpt.parent.mkdir()
    torch.save(model.state_dict(), ckpt)  # raw state dict, as the official releases
    assert infer_model_kwargs(model.state_dict()) == dict(
        embed_dim=16, in_chans=1, patch_size=2, depth=3, local_up_to_layer=2, num_heads=4, mlp_ratio=2.0,
        qkv_bias=True, num_classes=10, use_pos_embed=True, img_size=8)
    log = {"epoch": 0, "nonlocality": {"0": [1.0] * 4, "1": [1.5] * 4, "2": [2.0] * 4},
           "distances": {"0": [1.0] * 4, "1": [1.0] * 4}, "gating_params": {"0": [1.0] * 4, "1": [1.0] * 4}}
    (ckpt.parent / "log.txt").write_text(json.dumps(log) + "\n" + json.dumps(dict(log, epoch=1)) + "\n")
    out = tmp_path / "out"
    numbers = run([str(ckpt), "--output-dir", str(out), "--num-images", "6", "--query", "1,2", "--dpi", "40"])
    for path in _expected_pngs(out, 2) + [os.path.join(out, "training_log.png")]:
        _check_png(path, Image.open(path).size)
    with Image.open(out / "attention_maps_layer0.png") as im:
        assert im.size == (320, 216)  # 4 heads: (1.6 * 5, 1.6 * 3 + 0.6) inches at 40 dpi
    saved = json.loads((out / "analysis.json").read_text())
    assert saved["grid_size"] == [4, 4] and saved["query"] == [1, 2] and saved["num_images"] == 6
    assert set(saved["nonlocality"]) == {"0", "1", "2"} and set(saved["gates"]) == {"0", "1"}
    for i in range(2):
        g = model.blocks[i].attn.gating_param.detach().double()
        np.testing.assert_allclose(saved["gating_params"][str(i)], g.numpy(), rtol=1e-12)
        np.testing.assert_allclose(saved["gates"][str(i)], torch.sigmoid(g).numpy(), rtol=1e-12)
        np.testing.assert_allclose(saved["distances"][str(i)],
                                   attention_centers(model.blocks[i].attn.pos_proj.weight)[1].numpy(), rtol=1e-12)
        maps = np.array(saved["attention_maps"][str(i)]["mixed"])
        assert maps.shape == (4, 4, 4)
        np.testing.assert_allclose(maps.sum(axis=(1, 2)), 1.0, rtol=1e-6)  # a probability over the patches
    assert saved["training_log"]["epochs"] == [0, 1]
    assert numbers["source"]["kwargs"]["local_up_to_layer"] == 2
    # The official training script saves {"model": ..., "args": Namespace}; its embed_dim is per head.
    official = tmp_path / "official.pth"
    torch.save({"model": model.state_dict(), "epoch": 299,
                "args": argparse.Namespace(model="convit_tiny", embed_dim=48, input_size=8, nb_classes=10)}, official)
    numbers = run([str(official), "--output-dir", str(tmp_path / "out2"), "--num-images", "2"])
    assert numbers["source"]["kwargs"]["embed_dim"] == 16 and numbers["source"]["model"] == "convit_tiny"
    np.testing.assert_allclose(numbers["gating_params"]["1"], model.blocks[1].attn.gating_param.detach().numpy(),
                               rtol=1e-6)


def test_cli_on_our_checkpoint_with_its_config(tmp_path):
    # Our checkpoints carry the training config: it gives what the shapes cannot (a non-square image
    # size); where it disagrees with the shapes (an official-style per-head embed_dim), shapes win.
    model = _tiny_convit(img_size=(8, 4), local_up_to_layer=1)
    ckpt = tmp_path / "checkpoint.pth"
    torch.save({"model": model.state_dict(), "epoch": 3,
                "config": {"model": "convit_digits", "input_size": [8, 4], "nb_classes": None,
                           "local_up_to_layer": 1, "locality_strength": 1.0, "epochs": 30, "embed_dim": 4}}, ckpt)
    out = tmp_path / "out"
    numbers = run([str(ckpt), "--output-dir", str(out), "--num-images", "3"])
    assert numbers["grid_size"] == [4, 2] and numbers["query"] == [2, 1]
    for path in _expected_pngs(out, 1):
        assert os.path.getsize(path) > 1000
    assert not (out / "training_log.png").exists()
    torch.save(model.state_dict(), ckpt)  # raw, the grid is not square: the error says what to pass
    with pytest.raises(ValueError, match="--img-size"):
        run([str(ckpt), "--output-dir", str(out)])
    assert main([str(ckpt), "--output-dir", str(out)]) == 2  # the console script: an error line, status 2
    assert main([str(ckpt), "--output-dir", str(out), "--img-size", "8,4", "--num-images", "2"]) == 0


def test_cli_on_a_fresh_model(tmp_path):
    out = tmp_path / "fresh"
    numbers = run(["--model", "convit_tiny", "--img-size", "16", "--patch-size", "4", "--depth", "3",
                    "--local_up_to_layer", "2", "--num-classes", "10", "--num-images", "4",
                    "--output-dir", str(out), "--dpi", "40"])
    for path in _expected_pngs(out, 2):
        _check_png(path, Image.open(path).size)
    assert numbers["source"]["fresh_weights"] and numbers["grid_size"] == [4, 4]
    # Fresh GPSA layers keep the local init: 4 heads centred on the 4 diagonal half-patch offsets,
    # gates sigmoid(1), and positional maps much more local than the content ones.
    np.testing.assert_allclose(np.abs(numbers["centers"]["0"]), 0.5, rtol=1e-6)
    np.testing.assert_allclose(numbers["gates"]["1"], 1 / (1 + math.exp(-1)), rtol=1e-6)
    assert max(numbers["nonlocality_positional"]["0"]) < min(numbers["nonlocality_content"]["0"])


def test_cli_errors():
    with pytest.raises(ValueError, match="--model"):
        model_to_analyze()
    with pytest.raises(ValueError, match="unknown --model"):
        model_to_analyze(model_name="convit_huge")
    with pytest.raises(ValueError, match="--query"):
        run(["--model", "convit_tiny", "--img-size", "16", "--depth", "1", "--local_up_to_layer", "1",
              "--num-images", "1", "--query", "5,0", "--output-dir", "/nonexistent-never-written"])


def test_folder_images_are_what_evaluation_sees(tmp_path):
    # The analysis reads an image folder as training does: the training scan and its extensions (a
    # .gif is not an image there, so not here either), the evaluation transform at the model's
    # (H, W), picks spread over the classes; a grey model gets the channel mean.
    from convit import transforms as T
    from convit.data import sample_images

    rng = np.random.default_rng(0)
    pngs = []
    for cls in ("a", "b"):
        (tmp_path / "val" / cls).mkdir(parents=True)
        for i in range(2):
            pngs.append(tmp_path / "val" / cls / f"{i}.png")
            Image.fromarray(rng.integers(0, 256, (20 + 3 * i, 30, 3), dtype=np.uint8)).save(pngs[-1])
        Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / "val" / cls / "x.gif")
    tf = T.eval_transform((8, 12))
    expected = []
    for path in pngs:
        with Image.open(path) as im:
            expected.append(tf(im.convert("RGB")))
    expected = torch.stack(expected)
    x = sample_images(str(tmp_path), num_images=4, img_size=(8, 12), in_chans=3)
    assert x.shape == (4, 3, 8, 12)
    torch.testing.assert_close(x, expected, rtol=0, atol=0)
    two = sample_images(str(tmp_path), num_images=2, img_size=(8, 12), in_chans=1)
    torch.testing.assert_close(two, expected[::2].mean(1, keepdim=True), rtol=0, atol=0)  # one per class
    with pytest.raises(FileNotFoundError, match="--data-path"):
        sample_images(str(tmp_path / "missing"), img_size=8)
    pngs[1].write_bytes(b"not an image")  # the extension says PNG; the picked file is not one
    with pytest.raises(ValueError, match="1 of the 4 images picked cannot be read: .*1.png"):
        sample_images(str(tmp_path), num_images=4, img_size=8, in_chans=3)


def test_sample_efficiency_script_smoke(tmp_path, monkeypatch):
    # The study script end to end at a toy size (2 epochs on 10 % of the digits, one seed): its CSV
    # has one row per (variant, fraction, seed) and its plot is written. The real run is minutes long.
    import csv
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "sample_efficiency.py")
    spec = importlib.util.spec_from_file_location("sample_efficiency", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "sample_efficiency", module)  # the worker processes unpickle run_one by name
    spec.loader.exec_module(module)
    out = tmp_path / "se"
    assert module.main(["--fractions", "0.1", "--seeds", "0", "--base-epochs", "0.2", "--workers", "1",
                        "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(f"{out}.csv")))
    assert sorted(int(r["local_up_to_layer"]) for r in rows) == [0, 5]
    assert all(r["epochs"] == "2" and 0.0 <= float(r["final_acc1"]) <= 100.0 for r in rows)
    _check_png(f"{out}.png", (720, 480))  # SAMPLE_EFFICIENCY_FIGSIZE (6, 4) at 120 dpi
