"""The whole model: a training step and inference, images/s, for ConViT-Ti and ConViT-S.

Providers:
  reference, cpu, cuda, triton,  ``create_model(name, gpsa_backend=...)``; "reference" is the
  sdpa                           official eager model (the official GPSA formulation), "sdpa" the
                                 portable backend (what "auto" picks on a GPU without opt-ins)
  plain_attention                the same network with ``local_up_to_layer=0`` (every block MHSA on
                                 SDPA): what the model would cost without GPSA
  timm                           timm's ConViT (the official code's port), where timm is installed
Each runs eagerly and under ``torch.compile(model)`` (the optimizer step stays eager). Compiling a
model takes ~40 s on 2 CPU cores, so by default (CONVIT_BENCH_COMPILE=subset) the CPU runs only
ConViT-Ti inference compiled and a GPU compiles the official model, plain attention and the
backend that "auto" picks; CONVIT_BENCH_COMPILE=all compiles every case, =none none.

A training step is zero_grad, forward, cross-entropy, backward and AdamW (lr 5e-4, weight decay
0.05); inference is a forward under no_grad in eval mode. GPU: batch 128, bf16 autocast; CPU:
batch 4, fp32. The cache is not flushed between rounds: a step's working set is far beyond any cache.
"""
import os

import pytest
import torch
import torch.nn.functional as F

import convit
from convit_kernels.backends import KNOWN_BACKENDS, resolve_backend

from convit_bench import DEVICE, MEMORY_METHOD, ON_GPU, backend_or_skip_reason, peak_memory, rounds, sync

MODELS = ("convit_tiny", "convit_small")
PROVIDERS = KNOWN_BACKENDS + ("plain_attention", "timm")
BATCH = 128 if ON_GPU else 4
IMG = 224
ROUNDS = rounds(10, 3)
WARMUP = 3 if ON_GPU else 0
COMPILE = os.environ.get("CONVIT_BENCH_COMPILE", "subset")
if COMPILE not in ("all", "subset", "none"):
    raise ValueError(f"CONVIT_BENCH_COMPILE must be all, subset or none; got {COMPILE!r}")


def _compile_skip_reason(model_name, provider, mode):
    if COMPILE == "all":
        return None
    if COMPILE == "none":
        return "torch.compile model variants disabled (CONVIT_BENCH_COMPILE=none)"
    if not ON_GPU:
        if model_name == "convit_tiny" and mode == "infer" and provider != "timm":
            return None
        return ("on CPU only convit_tiny inference is compiled (~40 s per compile on 2 cores); "
                "CONVIT_BENCH_COMPILE=all compiles every case")
    auto = resolve_backend("auto", torch.device(DEVICE), torch.bfloat16).name
    if provider in ("reference", "plain_attention", auto):
        return None
    return (f"on GPU the subset compiles reference, plain_attention and the auto backend ({auto!r}); "
            "CONVIT_BENCH_COMPILE=all compiles every case")


def _skip_unavailable(provider):
    if provider in KNOWN_BACKENDS:
        reason = backend_or_skip_reason(provider, torch.bfloat16 if ON_GPU else torch.float32)
        if reason:
            pytest.skip(reason)
    elif provider == "timm":
        pytest.importorskip("timm", reason="timm is not installed: no timm ConViT to compare with")


def _build(model_name, provider):
    if provider in KNOWN_BACKENDS:
        return convit.create_model(model_name, gpsa_backend=provider)
    if provider == "plain_attention":
        return convit.create_model(model_name, local_up_to_layer=0)
    if provider == "timm":
        import timm

        return timm.create_model(model_name, pretrained=False)
    raise ValueError(f"unknown provider {provider!r}")


@pytest.mark.parametrize("mode", ("train", "infer"))
@pytest.mark.parametrize("compiled", ("eager", "compile"))
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("model_name", MODELS)
def test_model_step(benchmark, model_name, provider, compiled, mode):
    _skip_unavailable(provider)
    if compiled == "compile":
        reason = _compile_skip_reason(model_name, provider, mode)
        if reason:
            pytest.skip(reason)
    torch.manual_seed(0)
    model = _build(model_name, provider).to(DEVICE)
    net = torch.compile(model) if compiled == "compile" else model
    images = torch.randn(BATCH, 3, IMG, IMG, device=DEVICE)
    labels = torch.randint(0, 1000, (BATCH,), device=DEVICE)
    autocast = torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=ON_GPU)

    if mode == "train":
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05)

        def step():
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                loss = F.cross_entropy(net(images), labels)
            loss.backward()
            optimizer.step()
            sync()
    else:
        model.eval()

        def step():
            with torch.no_grad(), autocast:
                net(images)
            sync()

    benchmark.group = f"model {model_name} B={BATCH} {'bf16 autocast' if ON_GPU else 'fp32'} {mode}"
    benchmark.extra_info.update(kind="model", model=model_name, provider=provider, compiled=compiled,
                                mode=mode, batch=BATCH, img_size=IMG, device=DEVICE,
                                precision="bf16 autocast" if ON_GPU else "fp32", memory_method=MEMORY_METHOD)
    if not benchmark.disabled:
        # Untimed: the first step compiles and allocates the optimizer state; the second measures
        # peak memory (under the profiler on CPU) and doubles as a warm-up step.
        step()
        benchmark.extra_info["peak_bytes"] = peak_memory(step)
    benchmark.pedantic(step, rounds=ROUNDS, warmup_rounds=WARMUP)
    if not benchmark.disabled:
        benchmark.extra_info["images_per_s"] = BATCH / benchmark.stats.stats.median
