"""Train and evaluate ConViT with the DeiT recipe: ``convit-train`` / ``python -m convit.train``.

With no arguments it trains a small ConViT on scikit-learn's 8x8 digits on the CPU (a couple of
minutes, >= 95% validation accuracy). With ``--data-path`` it trains on an ImageFolder tree
(ImageNet), one GPU to many under ``torchrun`` (DistributedDataParallel). The file reads top to
bottom: set-up (distributed, device, model), evaluation, then ``train(config)``, the loop itself,
and ``main``.

Reproducibility: every step reseeds torch (drop path), the batch augmentations and their noise
from (seed, rank, epoch, batch), and every image's augmentation is seeded by the sampler; with
the optimizer, schedule and meters restored from a checkpoint, a run resumed at any step (even
after SIGKILL, with ``--save-every``) ends with exactly the weights of an uninterrupted run on CPU.

Faults: ``--resume auto`` makes one command line start a run and continue it after any restart
(torchrun ``--max-restarts``, a requeued job). A stop signal (``--stop-signals``, SIGTERM by
default) is agreed on by all ranks inside the step's loss all-reduce; every rank finishes that
step, rank 0 saves a checkpoint there, and the process exits with ``EXIT_STOPPED`` (3).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import random
import signal
import sys
import threading
import time
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .batch_augment import Mixup, RandomErasing, soft_target_cross_entropy
from .config import TrainConfig, parse_config, parse_stop_signals
from .data import UnreadableImageError, build_datasets, collate
from .locality import layer_locality_stats
from .models import ConViT, create_model
from .optim import WarmupCosineSchedule, create_optimizer, scaled_lr
from .runs import LOG_NAME, carry_log, claim_output_dir, continues_run_in, move_aside, resume_plan
from .samplers import BatchPlan, EvalSampler, TrainSampler, mix_seed
from .train_state import (AUTO, CHECKPOINT_NAME, PREVIOUS_NAME, capture_rng_state, find_resumable,
                          load_training_checkpoint, remove_stale_temporaries, restore_rng_state, resume_path,
                          save_checkpoint)
from .weights import load_checkpoint

__all__ = ["train", "main", "build_model", "evaluate", "NonFiniteLossError", "StopSignals", "EXIT_STOPPED"]

EXIT_STOPPED = 3  # convit-train's exit status after a stop signal (a checkpoint was saved at the stop step)


class NonFiniteLossError(RuntimeError):
    pass


class StopSignals:
    """Record the first stop signal (``--stop-signals``) instead of dying of it.

    The handler only sets ``signum`` (and says so on stderr with ``os.write``, which is safe in a
    handler): the training loop agrees on it across ranks at the next step's loss all-reduce,
    finishes that step and saves. A second signal while stopping changes nothing (the checkpoint
    is written atomically in any case); SIGKILL still stops at once. Handlers are installed only
    in the main thread (Python allows no other) and the previous ones are restored by ``restore``.
    """

    def __init__(self, signums=(), announce: bool = True):
        self.signums, self.announce = tuple(signums), announce
        self.signum = None
        self._previous = {}
        self._pid = os.getpid()

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "a stop signal on another rank"

    def install(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in self.signums:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:  # a forked child that inherited the handler: not ours to report
            return
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            text = (f"convit-train: {name} received: finishing the current step, then saving a checkpoint and "
                    f"exiting with status {EXIT_STOPPED}\n")
        else:
            text = f"convit-train: {name} received again: already stopping (the checkpoint is written atomically)\n"
        if self.announce:
            try:
                os.write(2, text.encode())
            except OSError:
                pass


def _ignore_signals(signums, worker_id=None) -> None:
    """DataLoader ``worker_init_fn``: a stop signal sent to the whole process group (torchrun
    forwards signals with killpg) must not kill the workers the main process still reads from."""
    for signum in signums:
        signal.signal(signum, signal.SIG_IGN)


# ----------------------------------------------------------------------------------------- set-up
@dataclasses.dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    initialised_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_type: str) -> Dist:
    """Join the process group torchrun describes (WORLD_SIZE > 1): nccl on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_initialized():
        return Dist(rank, world, local_rank)
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    backend = "nccl" if device_type == "cuda" else "gloo"
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and restarts:
        dist.init_process_group(backend=backend, store=dist.PrefixStore("convit-train", _attempt_store(rank, world)),
                                rank=rank, world_size=world)
    else:
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return Dist(rank, world, local_rank, initialised_here=True)


def _attempt_store(rank: int, world: int, timeout: float = 1800.0):
    """A key-value store that belongs to this attempt of a torchrun job alone.

    Under torchrun the workers share the agent's store by default, and it outlives a restart:
    the restarted workers can read the previous attempt's addresses from it and fail to connect
    (gloo "connectFullMesh ... Connection refused", NCCL likewise; torch issues 135712 and 167288).
    So rank 0 starts a fresh store on a free port and publishes its address and a random token
    in the agent's store; the other ranks connect to the address they read there and accept it
    only if the store answers with that token: an address left by the previous attempt points to
    a store that died with it, so they read again until rank 0 of this attempt has replaced it.
    """
    import datetime
    import uuid
    agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=datetime.timedelta(seconds=timeout))
    key = f"convit-train/attempt-store/{os.environ.get('TORCHELASTIC_RUN_ID', '')}"
    if rank == 0:
        import socket
        host = socket.getfqdn(socket.gethostname())
        own = dist.TCPStore(host, 0, world, is_master=True, timeout=datetime.timedelta(seconds=timeout),
                            wait_for_workers=False)
        token = uuid.uuid4().hex
        own.set("token", token)
        agent.set(key, f"{host} {own.port} {token}")
        return own
    deadline = time.monotonic() + timeout
    while True:
        host, port, token = agent.get(key).decode().split()
        try:
            own = dist.TCPStore(host, int(port), world, is_master=False, timeout=datetime.timedelta(seconds=5))
            if own.get("token").decode() == token:
                own.set_timeout(datetime.timedelta(seconds=timeout))
                return own
        except (RuntimeError, ValueError):  # DistNetworkError / DistStoreError are RuntimeErrors
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"rank {rank}: no store from rank 0 of this attempt after {timeout:g} s (last address "
                               f"read: {host}:{port})")
        time.sleep(0.2)


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _check_device(device: str) -> None:
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device!r}: not a device name; expected cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r}: convit-train runs on cpu or cuda (cuda:N); got a {dev.type} device")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device!r}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def default_threads(config: TrainConfig, workers: int) -> tuple:
    """(torch intra-op threads, why) for a run that did not give ``--threads``.

    On a busy machine, intra-op threads that wait for each other at every operator's end (OpenMP
    barriers, spin-waiting first) lose far more than they gain when the other threads' cores are
    taken: the digits default took 6-7x longer with 2 threads than with 1 on a loaded 2-core
    machine. So: ``OMP_NUM_THREADS`` when the user set it; 1 for the digits model, whose operators
    are too small to gain from more; otherwise the cores of this process (divided among
    ``LOCAL_WORLD_SIZE`` processes under torchrun) less the DataLoader workers, at least 1.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads(), "OMP_NUM_THREADS"
    if not config.data_path and not config.synthetic:
        return 1, "the digits model's operators are too small to gain from more"
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    cores = max(1, available_cores() // local)
    return max(1, cores - workers), f"{cores} core(s) per process less {workers} DataLoader worker(s)"


def resolve_runtime(config: TrainConfig) -> TrainConfig:
    """Fill the fields whose default depends on the machine or the data: device, amp, model, workers,
    threads, and (for a resumed training run without ``--output-dir``) the checkpoint's folder."""
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    _check_device(device)
    amp = config.amp or ("bf16" if device.startswith("cuda") else "none")
    if amp == "fp16" and not device.startswith("cuda"):
        raise ValueError("--amp fp16 needs a CUDA device (use bf16 or none on the CPU)")
    on_digits = not config.data_path and not config.synthetic
    model = config.model or ("convit_digits" if on_digits else "convit_small")
    workers = config.num_workers if config.num_workers is not None else (
        min(10, os.cpu_count() or 1) if config.data_path else 0)
    threads = config.threads or default_threads(config, workers)[0]
    output_dir = config.output_dir
    if output_dir is None and config.resume and not config.eval:
        output_dir = os.path.dirname(os.path.abspath(resume_path(config.resume)))
    return config.replace(device=device, amp=amp, model=model, num_workers=workers, threads=threads,
                          output_dir=output_dir)


def build_model(config: TrainConfig, num_classes: int, in_chans: int, input_size: int) -> ConViT:
    """The ConViT ``config.model`` names; ``convit_digits`` is the small model of the default run."""
    common = dict(num_classes=num_classes, in_chans=in_chans, drop_rate=config.drop,
                  drop_path_rate=config.drop_path, local_up_to_layer=config.local_up_to_layer,
                  locality_strength=config.locality_strength, gpsa_backend=config.gpsa_backend)
    if config.embed_dim is not None:
        common["embed_dim"] = config.embed_dim
    if config.model == "convit_digits":
        # 2x2 patches: a 4x4 grid of 16 tokens (one token per pixel trains far slower on 8x8 digits);
        # 4 heads, so the local init centres them on the 2x2 neighbourhood of offsets.
        return ConViT(img_size=input_size, patch_size=2, depth=6, num_heads=4, mlp_ratio=2.0,
                      **dict(dict(embed_dim=64), **common))
    return create_model(config.model, img_size=input_size, **common)


def autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def _all_reduce_sum(values, device, world: Dist):
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if world.world_size > 1:
        dist.all_reduce(t)
    return t.tolist()


# ------------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def evaluate(model, loader, device, amp: str, world: Dist) -> dict:
    """Loss, top-1 and top-5 (in %) over the validation images that could be read, summed across
    ranks; ``images`` counts those, ``unreadable`` the others (``unreadable_paths``: this rank's)."""
    model.eval()
    loss_sum = correct1 = correct5 = count = 0.0
    unreadable = []
    for images, targets, bad in loader:
        unreadable += bad
        if images is None:
            continue
        images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast(device, amp):
            logits = model(images)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
        hits = top.eq(targets.view(-1, 1))
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=-1).sum().item()
        count += targets.numel()
    loss_sum, correct1, correct5, count, n_bad = _all_reduce_sum(
        [loss_sum, correct1, correct5, count, len(unreadable)], device, world)
    images = int(count)
    count = max(count, 1.0)
    return {"loss": loss_sum / count, "acc1": 100.0 * correct1 / count, "acc5": 100.0 * correct5 / count,
            "images": images, "unreadable": int(n_bad), "unreadable_paths": unreadable}


def _val_count(stats: dict) -> str:
    if stats.get("unreadable", 0):
        return f"{stats['images']} of {stats['images'] + stats.get('unreadable', 0)}"
    return str(stats["images"])


def _warn_unreadable_val(stats: dict, warned: set) -> None:
    """One warning per unreadable validation file and run (evaluation repeats every epoch)."""
    new = [p for p in stats.get("unreadable_paths", []) if p not in warned]
    if stats.get("unreadable", 0) and (new or not warned):
        print(f"warning: {stats.get('unreadable', 0)} unreadable validation image(s) left out of the accuracy "
              f"(Acc@1 over {_val_count(stats)} images): {', '.join(new)}", file=sys.stderr)
    warned.update(new)


# -------------------------------------------------------------------------------------- training
def train(config: TrainConfig) -> dict:
    """Run (or, with ``config.eval``, only evaluate) as ``config`` says; return a summary dict:
    best_acc1, final test stats, epochs/steps done, time_s, train_images_per_s, n_parameters,
    skipped_images, output_dir, log (one dict per epoch, as written to log.txt)."""
    given_threads = config.validate().threads
    config = resolve_runtime(config)
    why_threads = "--threads" if given_threads else default_threads(config, config.num_workers)[1]
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)  # process-wide: restored on the way out
    stop = StopSignals(parse_stop_signals(config.stop_signals) if not config.eval else (),
                       announce=int(os.environ.get("RANK", "0")) == 0).install()
    try:
        world = setup_distributed(torch.device(config.device).type)
        try:
            return _train(config, world, why_threads, stop)
        finally:
            if world.initialised_here:
                dist.destroy_process_group()
    finally:
        stop.restore()
        torch.set_num_threads(previous_threads)


def _train(config: TrainConfig, world: Dist, why_threads: str = "", stop: Optional[StopSignals] = None) -> dict:
    stop = stop or StopSignals()
    device = torch.device(config.device)
    if device.type == "cuda" and world.world_size > 1:
        device = torch.device("cuda", world.local_rank)
    say = print if world.is_main else (lambda *a, **k: None)
    say("convit-train configuration:\n" + json.dumps(config.to_dict(), indent=1))
    say(f"threads: {config.threads} torch intra-op thread(s) ({why_threads}), {config.num_workers} DataLoader "
        "worker(s); set them with --threads N / --num-workers N")

    # Everything that can refuse the run does so before any data or model is built: the output
    # folder, then the checkpoint to resume and how this run's flags differ from its config.
    out_dir = None if config.eval else config.output_dir
    if config.resume == AUTO:
        found = find_resumable(out_dir, LOG_NAME)
        resume_file = found.path
        say(found.note)
    else:
        resume_file = resume_path(config.resume) if config.resume else None
    agree = (lambda flag: _all_reduce_sum([flag], device, world)[0]) if world.world_size > 1 else None
    claim_output_dir(out_dir, resume_file, config.overwrite, say, world.is_main, agree)
    state, plan_changes = None, {}
    if resume_file:
        state = load_training_checkpoint(resume_file)
        plan_changes = resume_plan(config, state, world.world_size)
    if world.world_size > 1:
        # Every rank must continue from the same step (they all read the folder on their own).
        step = float(state["global_step"]) if state is not None else -1.0
        lo_hi = torch.tensor([-step, step], dtype=torch.float64, device=device)
        dist.all_reduce(lo_hi, op=dist.ReduceOp.MAX)
        if -lo_hi[0].item() != lo_hi[1].item():
            raise ValueError(f"--resume {config.resume}: the processes found different checkpoints to continue from "
                             f"(steps {-lo_hi[0].item():g} to {lo_hi[1].item():g}, -1 = none); the --output-dir must "
                             "be one folder every node shares")
    # Continuing from the previous checkpoint while checkpoint.pth is there (unusable, or passed
    # over on purpose): the first save moves that file aside instead of rotating it into place.
    set_aside = None
    if (out_dir and resume_file and os.path.basename(resume_file) == PREVIOUS_NAME
            and continues_run_in(out_dir, resume_file) and os.path.isfile(os.path.join(out_dir, CHECKPOINT_NAME))):
        set_aside = CHECKPOINT_NAME
    if out_dir and world.is_main:
        stale = remove_stale_temporaries(out_dir)
        if stale:
            say(f"removed {len(stale)} temporary file(s) of interrupted checkpoint saves in {out_dir}: "
                + ", ".join(stale))

    # Data first: wrong paths and empty class folders fail here, before any model is built.
    data = build_datasets(config)
    say(f"data: {data.name}, {len(data.train)} training / {len(data.val)} validation images, "
        f"{data.num_classes} classes, {data.in_chans}x{data.input_size}x{data.input_size}")

    torch.manual_seed(config.seed)  # the same initial weights on every rank (DDP also broadcasts them)
    model = build_model(config, data.num_classes, data.in_chans, data.input_size)
    if config.pretrained:
        load_checkpoint(model, config.pretrained)
        say(f"loaded weights from {config.pretrained}")
    model.to(device)
    n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(f"model {config.model}: {n_parameters:,} parameters, GPSA backend {config.gpsa_backend!r}, "
        f"device {device}, amp {config.amp}, {world.world_size} process(es)")
    ema = copy.deepcopy(model).eval().requires_grad_(False) if config.model_ema else None

    global_batch = config.batch_size * world.world_size
    base_lr = config.lr if config.unscale_lr else scaled_lr(config.lr, global_batch)
    optimizer = create_optimizer(model, base_lr, config.weight_decay, config.opt_eps)
    scheduler = WarmupCosineSchedule(optimizer, base_lr, config.epochs, config.warmup_epochs, config.warmup_lr,
                                     config.min_lr)
    scaler = torch.amp.GradScaler("cuda") if config.amp == "fp16" else None

    start_epoch, start_batch, global_step, best_acc1 = 0, 0, 0, 0.0
    meters = {"loss_sum": 0.0, "steps": 0, "images": 0, "time": 0.0}
    history, resumes = [], []
    saved_step = None  # global step of the checkpoint now in ckpt_path, if this run knows one is there
    if state is not None:
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as err:  # an architecture difference the config comparison could not see
            first = str(err).strip().splitlines()
            raise ValueError(f"--resume {resume_file}: the checkpoint's weights do not fit this model ("
                             f"{' '.join(first[:2])[:300]}); pass the architecture flags it was trained with"
                             ) from None
        if ema is not None:
            if state.get("model_ema") is not None:
                ema.load_state_dict(state["model_ema"])
            else:
                ema.load_state_dict(model.state_dict())
                say("--model-ema: the checkpoint has no EMA weights; the average starts from its weights")
        where = f"epoch {state['epoch']}, batch {state['step_in_epoch']}, step {state['global_step']}"
        if config.eval:
            say(f"evaluating {resume_file}, saved at {where}")
        else:
            optimizer.load_state_dict(state["optimizer"])
            # load_state_dict restores the saved groups' hyper-parameters too: this run's apply.
            for group, decay in zip(optimizer.param_groups, (0.0, config.weight_decay)):
                group.update(weight_decay=decay, eps=config.opt_eps)
            say(f"resumed from {resume_file}: {where}")
            if plan_changes.get("schedule"):
                # The schedule of the new values, at the checkpoint's position on it.
                old_lr = WarmupCosineSchedule(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0),
                                              1.0, 1.0)
                old_lr.load_state_dict(state["scheduler"])
                scheduler.step(state["scheduler"]["t"])
                say("resume: schedule rebuilt for " + ", ".join(
                    f"--{k.replace('_', '-')} {v[1]} (was {v[0]})" for k, v in plan_changes["schedule"].items())
                    + f": base lr {scheduler.base_lr:.3g} over {scheduler.epochs:g} epochs; lr now "
                    f"{scheduler.lr_at(scheduler.t):.3g} at epoch {scheduler.t:g} (the checkpoint's schedule "
                    f"gave {old_lr.lr_at(old_lr.t):.3g})")
            else:
                scheduler.load_state_dict(state["scheduler"])
            if scaler is not None and state.get("scaler"):
                scaler.load_state_dict(state["scaler"])
            start_epoch, start_batch, global_step = state["epoch"], state["step_in_epoch"], state["global_step"]
            best_acc1 = state.get("best_acc1", 0.0)
            meters = dict(state.get("meters") or meters)
            history = list(state.get("history") or [])
            resumes = list(state.get("resumes") or [])
            restore_rng_state(state.get("rng"))
            if plan_changes.get("other"):
                say("resume: applied as given: " + ", ".join(
                    f"--{k.replace('_', '-')} {v[1]} (was {v[0]})" for k, v in plan_changes["other"].items()))
            changed = {k: list(v) for part in plan_changes.values() for k, v in part.items()}
            if changed:
                resumes.append({"epoch": start_epoch, "step_in_epoch": start_batch, "global_step": global_step,
                                "changed": changed})
            if out_dir and world.is_main:
                carry_log(resume_file, out_dir, start_epoch, say)
            if out_dir and os.path.realpath(resume_file) == os.path.realpath(os.path.join(out_dir, CHECKPOINT_NAME)):
                saved_step = global_step
        del state

    pin = device.type == "cuda"
    worker_init = functools.partial(_ignore_signals, stop.signums) if stop.signums else None
    eval_loader = torch.utils.data.DataLoader(
        data.val, batch_sampler=BatchPlan(EvalSampler(len(data.val), world.world_size, world.rank),
                                          2 * config.batch_size, drop_last=False),
        num_workers=config.num_workers, collate_fn=collate, pin_memory=pin, worker_init_fn=worker_init)
    eval_model = torch.compile(model) if config.compile else model

    if config.eval:
        stats = evaluate(eval_model, eval_loader, device, config.amp, world)
        if world.is_main:
            _warn_unreadable_val(stats, set())
        say(f"* Acc@1 {stats['acc1']:.3f} Acc@5 {stats['acc5']:.3f} loss {stats['loss']:.4f} "
            f"on {_val_count(stats)} validation images")
        return {"best_acc1": stats["acc1"], "final": stats, "epochs": 0, "global_step": 0, "time_s": 0.0,
                "train_images_per_s": 0.0, "n_parameters": n_parameters, "skipped_images": 0,
                "skipped_val_images": stats.get("unreadable", 0), "output_dir": config.output_dir, "log": []}

    if start_epoch >= config.epochs:
        # A finished run resumed as it was: nothing to train; say so, with the run's results.
        last = history[-1] if history else {}
        say(f"nothing to train: {resume_file} has finished all {start_epoch} epochs (best Acc@1 {best_acc1:.2f}%"
            + (f", final Acc@1 {last['test_acc1']:.2f}%" if "test_acc1" in last else "")
            + f", {global_step} steps); pass --epochs N with N > {start_epoch} to train longer")
        return {"best_acc1": best_acc1, "final": None, "epochs": 0, "global_step": global_step, "time_s": 0.0,
                "train_images_per_s": 0.0, "n_parameters": n_parameters, "skipped_images": 0,
                "skipped_val_images": 0, "stopped_early": False, "output_dir": out_dir, "log": history,
                "finished_before": True}

    train_model = model
    if world.world_size > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        train_model = torch.compile(train_model)

    sampler = TrainSampler(len(data.train), world.world_size, world.rank, seed=config.seed,
                           repeats=3 if config.repeated_aug else 1)
    plan = BatchPlan(sampler, config.batch_size, seed=config.seed, rank=world.rank, drop_last=True)
    steps_per_epoch = plan.num_batches()
    if steps_per_epoch < 1:
        raise ValueError(f"--batch-size {config.batch_size}: larger than the {len(sampler)} training images "
                         f"each of the {world.world_size} process(es) gets; no full batch to train on")
    # The sampler runs in this process, so changing plan.epoch/start_batch between epochs reaches
    # persistent workers too.
    train_loader = torch.utils.data.DataLoader(
        data.train, batch_sampler=plan, num_workers=config.num_workers, collate_fn=collate, pin_memory=pin,
        persistent_workers=config.num_workers > 0, worker_init_fn=worker_init)
    erasing = RandomErasing(config.reprob)
    mixup = Mixup(config.mixup, config.cutmix, config.mixup_prob, config.mixup_switch_prob, config.smoothing,
                  data.num_classes)

    locality_images = torch.stack([x for x, _, bad in (data.val[(i, 0)] for i in range(min(16, len(data.val))))
                                   if bad is None]).to(device)
    if out_dir and world.is_main:
        os.makedirs(out_dir, exist_ok=True)
    ckpt_path = os.path.join(out_dir, CHECKPOINT_NAME) if out_dir else None

    def save(epoch, step_in_epoch):
        nonlocal saved_step, set_aside
        if not (ckpt_path and world.is_main):
            return
        if set_aside and os.path.isfile(ckpt_path):
            # Every rank has read its checkpoint by now (the first step's collectives came before).
            dest = move_aside(out_dir, [set_aside])
            say(f"moved the {CHECKPOINT_NAME} this run did not continue from to {dest}")
        set_aside = None
        save_checkpoint(ckpt_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "model_ema": ema.state_dict() if ema is not None else None,
            "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
            "config": config.to_dict(), "rng": capture_rng_state(), "meters": dict(meters),
            "best_acc1": best_acc1, "n_parameters": n_parameters, "history": history,
            "world_size": world.world_size, "resumes": resumes})
        saved_step = global_step

    # The base lr and schedule length actually in use (a resumed schedule may differ from the flags
    # only where the resume plan said so, and then the config holds the new values).
    say(f"training {scheduler.epochs:g} epochs of {steps_per_epoch} steps, global batch {global_batch}, "
        f"base lr {scheduler.base_lr:.3g}"
        + (f", checkpoints in {out_dir}" if out_dir else ", no --output_dir: no checkpoints"))
    run_skipped, warned = set(), set()
    skipped_total, run_images, run_train_time = 0, 0, 0.0
    stopped_early = False
    stopped_at = None  # (epoch, step_in_epoch) where a stop signal ended the run
    run_start = time.time()
    last_stats = None
    for epoch in range(start_epoch, config.epochs):
        plan.epoch, plan.start_batch = epoch, (start_batch if epoch == start_epoch else 0)
        if plan.start_batch == 0:
            meters = {"loss_sum": 0.0, "steps": 0, "images": 0, "time": 0.0}
        if not config.sched_on_updates:
            scheduler.step(epoch)
        train_model.train()
        lr = scheduler.lr_at(scheduler.t)
        bar = _progress(steps_per_epoch, plan.start_batch, epoch, config, world)
        epoch_skipped = set()  # files, not draws: repeated augmentation draws each image up to 3 times
        tick = time.time()
        for i, (images, targets, bad) in enumerate(train_loader, start=plan.start_batch):
            for path in bad:
                if path not in warned:
                    print(f"warning: skipping unreadable image {path}", file=sys.stderr)
                    warned.add(path)
            epoch_skipped.update(bad)
            step_seed = mix_seed(config.seed, world.rank, epoch, i)
            torch.manual_seed(step_seed)  # drop path and anything else drawing from torch's global RNG
            rng = random.Random(step_seed)
            noise = torch.Generator(device).manual_seed(step_seed)
            lr = scheduler.step(epoch + i / steps_per_epoch) if config.sched_on_updates else scheduler.lr_at(scheduler.t)
            if images is None:
                # Every image of this batch was unreadable (already counted). Under DDP the other
                # ranks would wait for this one's gradients: make it an error there.
                if world.world_size > 1:
                    raise RuntimeError(f"every image of batch {i} of epoch {epoch} on rank {world.rank} is "
                                       f"unreadable: {bad}")
                continue
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            erasing(images, rng, noise)
            images, soft_targets = mixup(images, targets, rng)
            with autocast(device, config.amp):
                logits = train_model(images)
            loss = soft_target_cross_entropy(logits, soft_targets)

            # The stop flag rides on the loss all-reduce: every rank learns at this step whether any
            # rank got a stop signal, so all of them stop after the same step, at no extra collective.
            if world.world_size > 1:
                packed = torch.stack([loss.detach(), torch.tensor(float(stop.requested), dtype=loss.dtype,
                                                                  device=device)])
                dist.all_reduce(packed)
                loss_value, stop_flag = (packed / world.world_size).tolist()
                stop_now = stop_flag > 0
            else:
                loss_value, stop_now = loss.detach().item(), stop.requested
            if not math.isfinite(loss_value):
                if saved_step is not None:
                    kept = f"the last good checkpoint {ckpt_path} (step {saved_step}) is kept"
                elif ckpt_path:
                    kept = f"no checkpoint had been written yet to {ckpt_path}"
                else:
                    kept = "no --output-dir: no checkpoint"
                raise NonFiniteLossError(f"loss is {loss_value} at step {global_step + 1} (epoch {epoch}, batch "
                                         f"{i}); stopping training; {kept}")

            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                if config.clip_grad:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                if config.clip_grad:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
                optimizer.step()
            if ema is not None:
                with torch.no_grad():
                    for e, p in zip(ema.state_dict().values(), model.state_dict().values()):
                        if e.dtype.is_floating_point:
                            e.mul_(config.model_ema_decay).add_(p.detach(), alpha=1 - config.model_ema_decay)
                        else:
                            e.copy_(p)

            global_step += 1
            now = time.time()
            meters["loss_sum"] += loss_value
            meters["steps"] += 1
            meters["images"] += images.shape[0] * world.world_size
            meters["time"] += now - tick
            run_images += images.shape[0] * world.world_size
            run_train_time += now - tick
            tick = now
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}",
                                img_s=f"{meters['images'] / max(meters['time'], 1e-9):.0f}")
            if stop_now:
                # At the epoch's last step too: a resume at batch == steps_per_epoch runs no step and
                # goes on to the epoch's evaluation, so evaluation is not spent on the way out.
                stopped_at = (epoch, i + 1)
                save(epoch, i + 1)
                break
            if config.max_steps is not None and global_step >= config.max_steps:
                stopped_early = i + 1 < steps_per_epoch
                if stopped_early:
                    save(epoch, i + 1)
                break
            if config.save_every and global_step % config.save_every == 0 and i + 1 < steps_per_epoch:
                save(epoch, i + 1)
        if bar is not None:
            bar.close()
        skipped_paths = sorted(epoch_skipped)
        if world.world_size > 1 and _all_reduce_sum([len(skipped_paths)], device, world)[0]:
            gathered = [None] * world.world_size
            dist.all_gather_object(gathered, skipped_paths)
            skipped_paths = sorted({p for part in gathered for p in part})
        skipped_count = len(skipped_paths)
        run_skipped.update(skipped_paths)
        skipped_total = len(run_skipped)
        if stopped_early or stopped_at:
            break

        test = evaluate(eval_model, eval_loader, device, config.amp, world)
        if world.is_main:
            _warn_unreadable_val(test, warned)
        last_stats = test
        best_acc1 = max(best_acc1, test["acc1"])
        record = {"train_lr": lr, "train_loss": meters["loss_sum"] / max(meters["steps"], 1),
                  **{f"test_{k}": test[k] for k in ("loss", "acc1", "acc5")},
                  "epoch": epoch, "n_parameters": n_parameters,
                  "train_images_per_s": meters["images"] / max(meters["time"], 1e-9)}
        if ema is not None:
            record["test_ema_acc1"] = evaluate(ema, eval_loader, device, config.amp, world)["acc1"]
        if skipped_count:
            record["skipped_images"] = skipped_count
            record["skipped_paths"] = skipped_paths
        if test.get("unreadable", 0):
            record["test_images"] = test["images"]
            record["test_unreadable_images"] = test.get("unreadable", 0)
        record.update(_locality(model, locality_images))
        history.append({k: record[k] for k in ("epoch", "train_loss", "test_acc1", "train_images_per_s")})
        say(f"epoch {epoch}: train loss {record['train_loss']:.4f}, test loss {test['loss']:.4f}, "
            f"Acc@1 {test['acc1']:.2f}, Acc@5 {test['acc5']:.2f}"
            + (f" on {_val_count(test)} validation images" if test.get("unreadable", 0) else "")
            + f", {record['train_images_per_s']:.0f} img/s"
            + (f", {skipped_count} unreadable training image(s) skipped" if skipped_count else ""))
        if out_dir and world.is_main:
            # Written before the checkpoint: a kill between the two leaves a line past the
            # checkpoint's epoch, which a resume drops (runs.carry_log) before running that epoch again.
            with open(os.path.join(out_dir, LOG_NAME), "a") as f:
                f.write(json.dumps(record) + "\n")
        save(epoch + 1, 0)
        if config.max_steps is not None and global_step >= config.max_steps:
            break
        # A signal that came during the evaluation: stop at this epoch's checkpoint (ranks agree).
        if epoch + 1 < config.epochs and (_all_reduce_sum([float(stop.requested)], device, world)[0]
                                          if world.world_size > 1 else stop.requested):
            stopped_at = (epoch + 1, 0)
            break

    elapsed = time.time() - run_start
    img_s = run_images / max(run_train_time, 1e-9)
    val_unreadable = last_stats.get("unreadable", 0) if last_stats else 0
    summary = {"best_acc1": best_acc1, "final": last_stats, "epochs": len(history), "global_step": global_step,
               "time_s": elapsed, "train_images_per_s": img_s, "n_parameters": n_parameters,
               "skipped_images": skipped_total, "skipped_val_images": val_unreadable,
               "stopped_early": stopped_early, "output_dir": out_dir, "log": history}
    if stopped_at:
        summary.update(stopped_by=stop.name(), stopped_at={"epoch": stopped_at[0], "step_in_epoch": stopped_at[1],
                                                            "global_step": global_step},
                       checkpoint=ckpt_path)
        say(f"stopped by {stop.name()} after step {global_step} (epoch {stopped_at[0]}, batch {stopped_at[1]} of "
            f"{steps_per_epoch}), {elapsed:.1f} s; "
            + (f"checkpoint {ckpt_path} saved at that step; the same command with --resume auto (or --resume "
               f"{out_dir}) continues it" if ckpt_path else "no --output-dir: nothing saved")
            + f"; exit status {EXIT_STOPPED}")
    elif stopped_early:
        say(f"stopped after step {global_step} (--max_steps) in the middle of an epoch, {elapsed:.1f} s, "
            f"{img_s:.0f} training img/s" + (f"; resume with --resume {ckpt_path}" if ckpt_path else ""))
    elif last_stats is not None:
        say(f"done: best Acc@1 {best_acc1:.2f}%, final Acc@1 {last_stats['acc1']:.2f}% Acc@5 "
            f"{last_stats['acc5']:.2f}%, {elapsed:.1f} s, {img_s:.0f} training img/s"
            + (f", {skipped_total} unreadable training image(s) skipped" if skipped_total else "")
            + (f", {val_unreadable} unreadable validation image(s) left out" if val_unreadable else ""))
    return summary


def _progress(total, initial, epoch, config, world):
    if not (config.progress and world.is_main):
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is in the [train] extra; without it, the per-epoch lines remain
        return None
    return tqdm(total=total, initial=initial, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True,
                mininterval=0.5)


def _locality(model, images) -> dict:
    """The official per-layer log fields, JSON-ready: nonlocality, distances, gating_params."""
    stats = layer_locality_stats(model, images)
    return {key: {str(layer): values for layer, values in per_layer.items()} for key, per_layer in stats.items()}


def _one_line(err: BaseException) -> str:
    """An error's message on one line. An exception raised in a DataLoader worker arrives re-raised
    with the worker's traceback in its text; its last line is the original message."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught "):
        last = lines[-1]
        return last.split(": ", 1)[1] if last.split(": ", 1)[0].endswith(type(err).__name__) else last
    return " ".join(" ".join(lines).split())


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``convit-train`` console script: 0 on success, 1 for a non-finite loss, 2 with one
    ``convit-train: error:`` line for bad flags, paths, checkpoints or (with --strict-data) images,
    ``EXIT_STOPPED`` (3) after a stop signal (``--stop-signals``), the checkpoint saved at that step."""
    try:
        config = parse_config(argv)
        if train(config).get("stopped_by"):
            return EXIT_STOPPED
    except NonFiniteLossError as err:
        print(f"convit-train: error: {err}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, UnreadableImageError) as err:
        print(f"convit-train: error: {_one_line(err)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
