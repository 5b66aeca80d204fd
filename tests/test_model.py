"""The ConViT model: official parameter counts, keys, init, grids, checkpoints, swap_gpsa."""
import math
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import convit
from convit.locality import attention_centers, layer_inputs, layer_locality_stats, nonlocality
from convit.models import GPSA, MHSA
from convit.weights import resize_pos_embed

# docs/DESIGN.md, Table 1 column "params (official code)".
OFFICIAL_PARAMS = {
    "convit_tiny": 5_710_512, "convit_tiny_plus": 9_972_912, "convit_small": 27_777_322,
    "convit_small_plus": 48_979_882, "convit_base": 86_540_040, "convit_base_plus": 153_134_856,
}


def tiny(**kw):
    """A small ConViT for fast tests (3 GPSA + 1 MHSA blocks on a 4 x 5 grid)."""
    args = dict(img_size=(16, 20), patch_size=4, embed_dim=32, depth=4, num_heads=4, num_classes=7,
                local_up_to_layer=3)
    args.update(kw)
    return convit.ConViT(**args)


@pytest.mark.parametrize("name", list(OFFICIAL_PARAMS))
def test_parameter_counts_equal_official(name):
    with torch.device("meta"):
        model = convit.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == OFFICIAL_PARAMS[name]


def test_unknown_model_lists_known_ones():
    with pytest.raises(ValueError, match="convit_tiny, convit_tiny_plus"):
        convit.create_model("convit_huge")


def test_state_dict_keys_are_official():
    with torch.device("meta"):
        sd = convit.create_model("convit_tiny").state_dict()
    expected_top = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
                    "norm.weight", "norm.bias", "head.weight", "head.bias"}
    gpsa = {"norm1.weight", "norm1.bias", "attn.gating_param", "attn.qk.weight", "attn.v.weight",
            "attn.proj.weight", "attn.proj.bias", "attn.pos_proj.weight", "attn.pos_proj.bias",
            "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"}
    mhsa = (gpsa - {k for k in gpsa if k.startswith("attn.")}) | {"attn.qkv.weight", "attn.proj.weight",
                                                                "attn.proj.bias"}
    expected = set(expected_top)
    for i in range(12):
        expected |= {f"blocks.{i}.{k}" for k in (gpsa if i < 10 else mhsa)}
    assert set(sd) == expected
    assert sd["blocks.0.attn.qk.weight"].shape == (384, 192)
    assert sd["blocks.0.attn.pos_proj.weight"].shape == (4, 3)
    assert sd["blocks.0.attn.gating_param"].shape == (4,)
    assert sd["blocks.10.attn.qkv.weight"].shape == (576, 192)
    assert sd["pos_embed"].shape == (1, 196, 192)


@pytest.mark.parametrize("heads", [4, 9, 16])
def test_local_init_centres_heads_as_the_paper_says(heads):
    attn = GPSA(dim=heads * 8, num_heads=heads, locality_strength=2.0)
    k = int(math.sqrt(heads))
    c = (k - 1) / 2
    centers, _, alpha = attention_centers(attn.pos_proj.weight)
    for h1 in range(k):
        for h2 in range(k):
            h = h1 + k * h2
            assert centers[h].tolist() == pytest.approx([h2 - c, h1 - c])
    assert torch.allclose(alpha, torch.full((heads,), 2.0, dtype=torch.float64))
    assert torch.equal(attn.v.weight, torch.eye(heads * 8))
    # The positional attention peaks at the centre: check head 0 on a 7 x 7 grid, query in the middle.
    if heads == 9:
        x = torch.randn(1, 49, heads * 8)
        attn.gating_param.data.fill_(100.0)  # all positional
        a = attn.get_attention(x)[0]
        q = 24
        for h in range(heads):
            j = int(a[h, q].argmax())
            dx, dy = j % 7 - q % 7, j // 7 - q // 7
            assert (dx, dy) == tuple(centers[h].round().int().tolist())


def test_gpsa_module_matches_official_formulation():
    """GPSA.forward equals the official eager forward (attn @ v, projection) on the same weights."""
    attn = GPSA(dim=32, num_heads=4, grid_size=(4, 5))
    with torch.no_grad():
        attn.pos_proj.weight.add_(0.3 * torch.randn(4, 3))
        attn.gating_param.copy_(torch.randn(4))
    x = torch.randn(3, 20, 32)
    B, N, C = x.shape
    v = attn.v(x).reshape(B, N, 4, 8).permute(0, 2, 1, 3)
    official = attn.proj((attn.get_attention(x) @ v).transpose(1, 2).reshape(B, N, C))
    torch.testing.assert_close(attn(x), official, atol=1e-5, rtol=1e-5)


def test_forward_backward_square_and_rectangular_images():
    # convit_tiny's width, heads and 16-pixel patches at full image sizes, 14 x 14 and 14 x 20 grids;
    # two blocks (one GPSA, one MHSA after the class token joins) instead of twelve: the other ten
    # repeat the same two code paths and cost 4/5 of the time.
    for size in [(224, 224), (224, 320)]:
        model = convit.create_model("convit_tiny", img_size=size, depth=2, local_up_to_layer=1)
        assert [type(b.attn) for b in model.blocks] == [GPSA, MHSA]
        assert model.blocks[0].attn.grid_size == (size[0] // 16, size[1] // 16)
        out = model(torch.randn(2, 3, *size))
        assert out.shape == (2, 1000)
        out.sum().backward()
        assert all(p.grad is not None for p in model.parameters())


def test_wrong_image_size_is_named():
    with pytest.raises(ValueError, match="expected images of shape"):
        tiny()(torch.randn(1, 3, 20, 20))


def test_plain_attention_variant():
    model = tiny(local_up_to_layer=0)
    assert not any(isinstance(m, GPSA) for m in model.modules())
    assert model(torch.randn(2, 3, 16, 20)).shape == (2, 7)


def test_attention_maps_and_nonlocality():
    model = tiny()
    x = torch.randn(2, 20, 32)
    dist, amap = model.blocks[0].attn.get_attention_map(x, return_map=True)
    assert dist.shape == (4,) and amap.shape == (4, 20, 20)
    torch.testing.assert_close(amap.sum(-1), torch.ones(4, 20))
    mh = MHSA(32, 4)
    assert mh.get_attention_map(torch.randn(2, 17, 32)).shape == (4,)  # class token + 4 x 4 patches


def test_attention_map_drops_the_class_token_and_renormalises():
    mh = MHSA(32, 4)
    x = torch.randn(2, 17, 32)  # class token + 4 x 4 patches
    dist, amap = mh.get_attention_map(x, return_map=True)
    want = mh.get_attention(x).mean(0)[:, 1:, 1:]
    want = want / want.sum(-1, keepdim=True)
    torch.testing.assert_close(amap, want, rtol=0, atol=0)
    torch.testing.assert_close(dist, nonlocality(want, (4, 4)).float(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="neither a square grid"):
        mh.get_attention_map(torch.randn(2, 19, 32))


def test_layer_inputs_are_what_each_attention_sees():
    model = tiny().train()
    images = torch.randn(3, 3, 16, 20)
    inputs = layer_inputs(model, images)
    assert list(inputs) == [0, 1, 2, 3] and model.training  # mode restored
    assert all(not block.attn._forward_pre_hooks for block in model.blocks)  # hooks removed
    assert [tuple(x.shape) for x in inputs.values()] == [(3, 20, 32)] * 3 + [(3, 21, 32)]  # class token joins
    with torch.no_grad():
        model.eval()
        first = model.blocks[0].norm1(model.patch_embed(images) + model.pos_embed)
    torch.testing.assert_close(inputs[0], first)
    gpsa = layer_inputs(model, images, gpsa_only=True)
    assert list(gpsa) == [0, 1, 2]
    stats = layer_locality_stats(model, images)
    assert set(stats["nonlocality"]) == {0, 1, 2, 3} and set(stats["gating_params"]) == {0, 1, 2}


def test_model_module_does_not_import_the_analysis():
    # convit.locality reads the model; the model must load without it (no import cycle).
    code = "import sys, convit.models; assert 'convit.locality' not in sys.modules, sorted(sys.modules); print('ok')"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


def _save(obj, tmp_path, name="ckpt.pth"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_load_checkpoint_raw_and_wrapped(tmp_path):
    src, dst = tiny(), tiny()
    for obj in (src.state_dict(), {"model": src.state_dict(), "epoch": 3}):
        convit.load_checkpoint(dst, _save(obj, tmp_path))
        for k, v in src.state_dict().items():
            assert torch.equal(dst.state_dict()[k], v), k


def test_load_checkpoint_interpolates_pos_embed(tmp_path):
    src = tiny(img_size=16)  # 4 x 4 grid
    dst = tiny(img_size=(24, 32))  # 6 x 8 grid
    convit.load_checkpoint(dst, _save(src.state_dict(), tmp_path))
    expected = resize_pos_embed(src.pos_embed.detach(), (4, 4), (6, 8))
    assert torch.equal(dst.pos_embed.detach(), expected)
    # A constant embedding stays constant under bicubic resizing: a sanity check of the layout.
    flat = torch.full((1, 16, 32), 0.5)
    torch.testing.assert_close(resize_pos_embed(flat, (4, 4), (6, 8)), torch.full((1, 48, 32), 0.5))
    assert dst(torch.randn(1, 3, 24, 32)).shape == (1, 7)


def test_load_checkpoint_errors(tmp_path):
    model = tiny()
    bad = tiny(embed_dim=48).state_dict()
    with pytest.raises(ValueError, match="shape mismatches: .*blocks.0.attn.qk.weight"):
        convit.load_checkpoint(model, _save(bad, tmp_path))
    sd = model.state_dict()
    sd.pop("head.bias")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys: \['head.bias'\]; unexpected keys: \['extra.weight'\]"):
        convit.load_checkpoint(model, _save(sd, tmp_path))
    (tmp_path / "junk.pth").write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="could not be read as a torch checkpoint"):
        convit.load_checkpoint(model, tmp_path / "junk.pth")
    with pytest.raises(ValueError, match="is not a model checkpoint"):
        convit.load_checkpoint(model, _save({"epoch": 1}, tmp_path))
    with pytest.raises(FileNotFoundError):
        convit.load_checkpoint(model, tmp_path / "absent.pth")


class ForeignGPSA(nn.Module):
    """The attribute layout of timm's / the official GPSA, with its own eager forward."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads, self.dim = num_heads, dim
        self.scale = (dim // num_heads) ** -0.5
        self.qk = nn.Linear(dim, 2 * dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.pos_proj = nn.Linear(3, num_heads)
        self.proj_drop = nn.Dropout(0.0)
        self.gating_param = nn.Parameter(torch.randn(num_heads))
        self.rel_indices = None

    def forward(self, x):
        B, N, C = x.shape
        s = int(N ** 0.5)
        ind = torch.arange(s).view(1, -1) - torch.arange(s).view(-1, 1)
        indx, indy = ind.repeat(s, s), ind.repeat_interleave(s, 0).repeat_interleave(s, 1)
        rel = torch.stack([indx, indy, indx ** 2 + indy ** 2], -1).float().unsqueeze(0)
        qk = self.qk(x).reshape(B, N, 2, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k = qk[0], qk[1]
        pos = self.pos_proj(rel.expand(B, -1, -1, -1)).permute(0, 3, 1, 2).softmax(-1)
        patch = ((q @ k.transpose(-2, -1)) * self.scale).softmax(-1)
        gate = torch.sigmoid(self.gating_param.view(1, -1, 1, 1))
        attn = (1.0 - gate) * patch + gate * pos
        attn = attn / attn.sum(-1, keepdim=True)
        v = self.v(x).reshape(B, N, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


def test_swap_gpsa_on_a_timm_like_module_tree():
    model = nn.Sequential()
    model.blocks = nn.ModuleList([nn.Module() for _ in range(2)])
    for blk in model.blocks:
        blk.attn = ForeignGPSA(32, 4)
    x = torch.randn(2, 16, 32)
    before = [blk.attn(x) for blk in model.blocks]
    keys = set(model.state_dict())
    params = [id(p) for p in model.parameters()]
    convit.swap_gpsa(model, backend="reference")
    assert all(isinstance(blk.attn, GPSA) and blk.attn.backend == "reference" for blk in model.blocks)
    assert set(model.state_dict()) == keys and [id(p) for p in model.parameters()] == params
    for blk, ref in zip(model.blocks, before):
        torch.testing.assert_close(blk.attn(x), ref, atol=1e-5, rtol=1e-5)
    convit.swap_gpsa(model, backend="auto")
    assert all(blk.attn.backend == "auto" for blk in model.blocks)


def test_swap_gpsa_errors():
    with pytest.raises(ValueError, match="no GPSA layer"):
        convit.swap_gpsa(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="gpsa_backend must be 'auto' or one of"):
        convit.swap_gpsa(tiny(), backend="fastest")
