"""Unit tests of the training recipe's parts: schedule, weight-decay groups, Mixup/CutMix,
random erasing, samplers, transforms, the config and atomic checkpoints. Quick (no training)."""
import math
import os
import random

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import convit
from convit import transforms as T
from convit.batch_augment import Mixup, RandomErasing, smooth_one_hot, soft_target_cross_entropy
from convit.config import DIGITS_PRESET, TrainConfig, parse_config
from convit.data import collate, subsample_per_class
from convit.optim import WarmupCosineSchedule, param_groups, scaled_lr
from convit.samplers import BatchPlan, EvalSampler, TrainSampler, mix_seed
from convit.train_state import CheckpointError, load_training_checkpoint, save_checkpoint


def _tiny_model():
    return convit.ConViT(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=16, depth=2, num_heads=4,
                         local_up_to_layer=1)


# --------------------------------------------------------------------------------- optimisation
def test_schedule_values():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s = WarmupCosineSchedule(opt, base_lr=1e-3, epochs=300, warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-6)  # set at construction: t = 0
    assert s.lr_at(2.5) == pytest.approx(1e-6 + 2.5 * (1e-3 - 1e-6) / 5)
    # After warm-up: cosine in absolute t (timm's CosineLRScheduler without warmup_prefix).
    assert s.lr_at(5) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 5 / 300)))
    assert s.lr_at(150) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert s.lr_at(300) == pytest.approx(1e-5) and s.lr_at(400) == pytest.approx(1e-5)
    assert s.step(150) == opt.param_groups[0]["lr"]
    s2 = WarmupCosineSchedule(opt, 1.0, 10)
    s2.load_state_dict(s.state_dict())
    assert s2.lr_at(150) == s.lr_at(150) and opt.param_groups[0]["lr"] == s.lr_at(150)


def test_scaled_lr():
    assert scaled_lr(5e-4, 1024) == pytest.approx(1e-3)
    assert scaled_lr(5e-4, 512) == pytest.approx(5e-4)


def test_weight_decay_groups():
    model = _tiny_model()
    no_decay, decay = param_groups(model, 0.05)
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert {"pos_embed", "cls_token", "blocks.0.attn.gating_param", "blocks.0.norm1.weight", "norm.bias",
            "head.bias", "blocks.0.attn.pos_proj.bias"} <= nd
    assert {"blocks.0.attn.qk.weight", "blocks.1.attn.qkv.weight", "head.weight", "patch_embed.proj.weight",
            "blocks.0.attn.pos_proj.weight"} <= d
    assert nd.isdisjoint(d) and len(nd) + len(d) == len(names)
    # The same groups through DistributedDataParallel's "module." prefix.
    wrapped = torch.nn.Module()
    wrapped.module = model
    nd2 = {names[id(p)] for p in param_groups(wrapped, 0.05)[0]["params"]}
    assert nd2 == nd


# --------------------------------------------------------------------------- batch augmentation
def test_smoothing_and_soft_target_loss():
    target = torch.randint(0, 7, (5,))
    y = smooth_one_hot(target, 7, 0.1)
    assert torch.allclose(y.sum(-1), torch.ones(5))
    assert torch.allclose(y.gather(1, target.view(-1, 1)).squeeze(1), torch.full((5,), 0.9 + 0.1 / 7))
    logits = torch.randn(5, 7)
    # Soft-target CE of smoothed one-hot targets is PyTorch's label-smoothed CE (float32 rounding).
    torch.testing.assert_close(soft_target_cross_entropy(logits, y), F.cross_entropy(logits, target,
                                                                                     label_smoothing=0.1))


def test_mixup_mixes_images_and_labels_by_lam():
    x = torch.randn(6, 3, 8, 8)
    target = torch.randint(0, 10, (6,))
    mix = Mixup(mixup_alpha=0.8, cutmix_alpha=0.0, prob=1.0, label_smoothing=0.1, num_classes=10)
    lam, use_cutmix = mix.draw(random.Random(3))
    assert not use_cutmix and 0.0 < lam < 1.0
    out, y = mix(x.clone(), target, random.Random(3))
    torch.testing.assert_close(out, lam * x + (1 - lam) * x.flip(0))
    y1, y2 = smooth_one_hot(target, 10, 0.1), smooth_one_hot(target.flip(0), 10, 0.1)
    torch.testing.assert_close(y, lam * y1 + (1 - lam) * y2)
    assert torch.allclose(y.sum(-1), torch.ones(6))


def test_cutmix_label_weight_is_the_pasted_area():
    x = torch.randn(4, 1, 16, 16)
    target = torch.tensor([0, 1, 2, 3])
    mix = Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, prob=1.0, label_smoothing=0.0, num_classes=4)
    for seed in range(5):
        out, y = mix(x.clone(), target, random.Random(seed))
        pasted = (out != x).float().mean().item()  # fraction of pixels taken from the reversed batch
        # Row 0 is mixed with row 3: its label weight on class 3 must be the pasted area exactly.
        assert y[0, 3].item() == pytest.approx(pasted, abs=1e-6)
        assert y[0, 0].item() == pytest.approx(1 - pasted, abs=1e-6)


def test_mixup_off_only_smooths():
    mix = Mixup(0.0, 0.0, 1.0, 0.5, 0.1, 10)
    x = torch.randn(3, 1, 4, 4)
    out, y = mix(x.clone(), torch.tensor([1, 2, 3]), random.Random(0))
    assert torch.equal(out, x) and torch.equal(y, smooth_one_hot(torch.tensor([1, 2, 3]), 10, 0.1))


def test_random_erasing():
    x = torch.zeros(8, 3, 32, 32)
    RandomErasing(probability=1.0)(x, random.Random(0), torch.Generator().manual_seed(0))
    for img in x:
        frac = (img[0] != 0).float().mean().item()
        assert 0.02 * 0.5 <= frac <= 1 / 3 + 0.05  # one rectangle of 2%-33% of the area (rounding)
    y = torch.zeros(8, 3, 32, 32)
    RandomErasing(probability=0.0)(y, random.Random(0))
    assert not y.any()


# ------------------------------------------------------------------------------------- samplers
@pytest.mark.parametrize("world", [1, 2, 3])
def test_train_sampler_covers_every_image_once(world):
    n = 23
    parts = [TrainSampler(n, world, r, seed=5).indices(epoch=2) for r in range(world)]
    assert len({len(p) for p in parts}) == 1  # equal length: no rank waits at a collective
    flat = [i for p in parts for i in p]
    assert set(flat) == set(range(n)) and len(flat) - n < world  # padding adds fewer than W repeats
    assert parts[0] != TrainSampler(n, world, 0, seed=5).indices(epoch=3)  # reshuffled each epoch


def test_repeated_augmentation_sampler():
    n, world = 24, 2
    order = TrainSampler(n, 1, 0, seed=0, repeats=3)
    parts = [TrainSampler(n, world, r, seed=0, repeats=3).indices(0) for r in range(world)]
    assert all(len(p) == n // world for p in parts)  # an epoch is as long as without repeats
    # Consecutive copies land on different ranks: rank 0 position k pairs with rank 1 position k.
    full = torch.arange(n)[torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(0, 0)))]
    expect = full.repeat_interleave(3).tolist()
    assert parts[0] == expect[0::2][:12] and parts[1] == expect[1::2][:12]
    counts = torch.bincount(torch.tensor(order.indices(0) * 3), minlength=n)
    assert len(order.indices(0)) == n and counts.max() <= 9


def test_eval_sampler_and_batch_plan():
    parts = [EvalSampler(10, 3, r).indices() for r in range(3)]
    assert sorted(i for p in parts for i in p) == list(range(10))
    s = TrainSampler(20, 1, 0, seed=1)
    full = list(BatchPlan(s, 4, epoch=1, seed=1))
    tail = list(BatchPlan(s, 4, epoch=1, seed=1, start_batch=2))
    assert tail == full[2:] and len(full) == 5 and len(BatchPlan(s, 3)) == 6  # 20 // 3, drop_last
    assert len({seed for b in full for _, seed in b}) == 20  # one augmentation seed per position


def test_subsample_per_class():
    targets = [0] * 10 + [1] * 30
    keep = subsample_per_class(targets, 0.1, seed=0)
    assert sum(targets[i] == 0 for i in keep) == 1 and sum(targets[i] == 1 for i in keep) == 3
    assert keep == subsample_per_class(targets, 0.1, seed=0)


# ----------------------------------------------------------------------------------- transforms
def _random_image(w=50, h=40):
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), dtype=torch.uint8).numpy())


def test_train_and_eval_transforms():
    img = _random_image()
    x = T.train_transform(24)(img, random.Random(0))
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32
    assert torch.equal(x, T.train_transform(24)(img, random.Random(0)))  # the rng decides everything
    ev = T.eval_transform(224)
    assert T.ResizeShorter(256)(_random_image(300, 200)).size == (384, 256)
    assert ev(_random_image(300, 200)).shape == (3, 224, 224)
    crop = T.RandomResizedCrop(10)
    for seed in range(20):
        left, top, w, h = crop.get_box(50, 40, random.Random(seed))
        assert 0 <= left and left + w <= 50 and 0 <= top and top + h <= 40


def test_rand_augment_every_op():
    assert T.parse_rand_augment("rand-m9-mstd0.5-inc1") == (2, 9.0, 0.5)
    with pytest.raises(ValueError, match="--aa"):
        T.parse_rand_augment("autoaug")
    img = _random_image(16, 16)
    for name, op in T._RAND_OPS.items():
        out = op(img, 9.0, random.Random(0))
        assert out.size == img.size and out.mode == "RGB", name
    ra = T.RandAugment(2, 9, 0.5, prob=1.0)
    assert ra(img, random.Random(1)).size == (16, 16)


# ------------------------------------------------------------------------------------ config
def test_config_flags_map_one_to_one():
    a = parse_config(["--batch-size", "32", "--drop_path", "0.2", "--model-ema", "--amp", "none"])
    b = parse_config(["--batch_size", "32", "--drop-path", "0.2", "--model_ema", "true", "--amp", "none"])
    assert a == b and a.batch_size == 32 and a.drop_path == 0.2 and a.model_ema
    # Digits preset fills the fields not given; given flags win.
    assert a.model == DIGITS_PRESET["model"] and a.epochs == DIGITS_PRESET["epochs"]
    assert parse_config(["--epochs", "3"]).epochs == 3
    imagenet = parse_config(["--data-path", "/x"])
    assert imagenet.epochs == 300 and imagenet.mixup == 0.8 and imagenet.reprob == 0.25 and imagenet.repeated_aug
    assert TrainConfig.from_dict(a.to_dict()) == a
    with pytest.raises(ValueError, match="--sampling-ratio"):
        parse_config(["--sampling_ratio", "0"])
    with pytest.raises(ValueError, match="--eval"):
        parse_config(["--eval"])


def test_collate_drops_unreadable():
    batch = [(torch.zeros(1, 2, 2), 1, None), (None, 0, "/bad.png"), (torch.ones(1, 2, 2), 2, None)]
    x, y, bad = collate(batch)
    assert x.shape == (2, 1, 2, 2) and y.tolist() == [1, 2] and bad == ["/bad.png"]


# --------------------------------------------------------------------------------- checkpoints
def test_atomic_checkpoint_roundtrip_and_errors(tmp_path):
    path = str(tmp_path / "checkpoint.pth")
    model = _tiny_model()
    state = {"model": model.state_dict(), "optimizer": {}, "scheduler": {"t": 1.0}, "epoch": 1,
             "step_in_epoch": 0, "global_step": 7, "config": TrainConfig().to_dict(),
             "rng": {"python": random.getstate(), "torch": torch.get_rng_state()}}
    save_checkpoint(path, state)
    raw = torch.load(path, weights_only=True)  # plain data only
    assert raw["global_step"] == 7 and raw["format"] == "convit-train/1"
    loaded = load_training_checkpoint(path)
    assert all(torch.equal(loaded["model"][k], v) for k, v in model.state_dict().items())
    good = open(path, "rb").read()

    # A save that fails midway leaves the previous checkpoint intact and no temporary file.
    with pytest.raises(Exception):
        save_checkpoint(path, dict(state, bad=lambda: None))
    assert open(path, "rb").read() == good and os.listdir(tmp_path) == ["checkpoint.pth"]

    truncated = str(tmp_path / "truncated.pth")
    open(truncated, "wb").write(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_training_checkpoint(truncated)
    foreign = str(tmp_path / "foreign.pth")
    torch.save(model.state_dict(), foreign)
    with pytest.raises(CheckpointError, match="not a convit-train checkpoint"):
        load_training_checkpoint(foreign)
