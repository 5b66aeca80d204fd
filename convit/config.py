"""The one home of the training configuration: ``TrainConfig``.

Field names are the official DeiT/ConViT argument names (``batch_size``, ``drop_path``,
``warmup_epochs``, ``sampling_ratio``, ...). Every field is a command-line flag, spelled with
underscores or dashes (``--batch-size`` and ``--batch_size`` are the same flag), one to one.

Defaults are the ImageNet recipe of the paper (docs/DESIGN.md section 1). Without ``--data-path`` (and
without ``--synthetic``) the run trains on scikit-learn's 8x8 digits, and the digits preset
(``DIGITS_PRESET``) replaces the defaults of the fields the user did not set: a small ConViT,
a short schedule, and no ImageNet-size augmentation.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field, fields
from typing import Optional, Sequence

__all__ = ["TrainConfig", "DIGITS_PRESET", "build_parser", "parse_config", "parse_stop_signals"]

AMP_CHOICES = ("bf16", "fp16", "none")


def gpsa_backend_choices() -> tuple:
    """'auto' and every backend convit_kernels knows (read from it, so new backends appear here)."""
    from convit_kernels.backends import KNOWN_BACKENDS
    return ("auto",) + tuple(KNOWN_BACKENDS)


@dataclass
class TrainConfig:
    # What to train.
    model: Optional[str] = field(default=None, metadata={
        "help": "model name (convit_tiny ... convit_base_plus, or convit_digits); "
                "default convit_digits on the digits, else convit_small"})
    input_size: Optional[int] = field(default=None, metadata={"help": "image size (default 224; 8 for digits)"})
    nb_classes: Optional[int] = field(default=None, metadata={
        "help": "number of classes (default: from the data; 1000 with --synthetic)"})
    embed_dim: Optional[int] = field(default=None, metadata={"help": "total width override (default: the model's)"})
    local_up_to_layer: int = field(default=10, metadata={"help": "number of GPSA blocks"})
    locality_strength: float = field(default=1.0, metadata={"help": "alpha of the local initialisation"})
    drop: float = field(default=0.0, metadata={"help": "dropout rate"})
    drop_path: float = field(default=0.1, metadata={"help": "stochastic depth rate"})
    gpsa_backend: str = field(default="auto", metadata={"help": "GPSA kernel: auto or one of convit_kernels' backends"})
    pretrained: Optional[str] = field(default=None, metadata={"help": "initial weights (an official checkpoint)"})
    model_ema: bool = field(default=False, metadata={"help": "keep an exponential moving average of the weights"})
    model_ema_decay: float = field(default=0.99996, metadata={"help": "EMA decay per step"})

    # Optimisation.
    batch_size: int = field(default=64, metadata={"help": "images per process and step"})
    epochs: int = field(default=300, metadata={"help": "training epochs"})
    lr: float = field(default=5e-4, metadata={"help": "learning rate for a global batch of 512 (scaled linearly)"})
    unscale_lr: bool = field(default=False, metadata={"help": "use --lr as given, without the batch/512 scaling"})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW weight decay (none on biases, norms, "
                                                                "pos_embed, cls_token)"})
    opt_eps: float = field(default=1e-8, metadata={"help": "AdamW epsilon"})
    clip_grad: Optional[float] = field(default=None, metadata={"help": "clip the gradient norm (default: off)"})
    warmup_lr: float = field(default=1e-6, metadata={"help": "learning rate at the start of the warm-up"})
    min_lr: float = field(default=1e-5, metadata={"help": "floor of the cosine schedule"})
    warmup_epochs: float = field(default=5, metadata={"help": "linear warm-up epochs"})
    sched_on_updates: bool = field(default=False, metadata={
        "help": "update the schedule every step (default: every epoch, as the official code)"})

    # Augmentation (the DeiT recipe).
    color_jitter: float = field(default=0.4, metadata={"help": "colour jitter (used only without --aa)"})
    aa: Optional[str] = field(default="rand-m9-mstd0.5-inc1", metadata={
        "help": "RandAugment policy 'rand-m<magnitude>-mstd<std>[-n<ops>]', or 'none'"})
    train_interpolation: str = field(default="bicubic", metadata={"help": "bicubic or bilinear"})
    smoothing: float = field(default=0.1, metadata={"help": "label smoothing"})
    reprob: float = field(default=0.25, metadata={"help": "random erasing probability"})
    mixup: float = field(default=0.8, metadata={"help": "Mixup alpha (0 = off)"})
    cutmix: float = field(default=1.0, metadata={"help": "CutMix alpha (0 = off)"})
    mixup_prob: float = field(default=1.0, metadata={"help": "probability of Mixup or CutMix per batch"})
    mixup_switch_prob: float = field(default=0.5, metadata={"help": "probability of CutMix when both are on"})
    repeated_aug: bool = field(default=True, metadata={"help": "repeated augmentation (3 repeats)"})
    digits_shift: int = field(default=0, metadata={"help": "digits only: random translation of up to N pixels"})

    # Data.
    data_path: Optional[str] = field(default=None, metadata={
        "help": "ImageFolder root with train/ and val/ (default: scikit-learn digits)"})
    sampling_ratio: float = field(default=1.0, metadata={"help": "fraction of each training class kept"})
    synthetic: bool = field(default=False, metadata={"help": "random images, for throughput runs without data"})
    strict_data: bool = field(default=False, metadata={"help": "an unreadable image is an error, not skipped"})
    num_workers: Optional[int] = field(default=None, metadata={
        "help": "DataLoader workers (default min(10, CPU cores) for ImageFolder, 0 otherwise)"})
    threads: Optional[int] = field(default=None, metadata={
        "help": "torch intra-op threads (default: OMP_NUM_THREADS if set; 1 for the digits model; else the "
                "cores per process less the DataLoader workers, at least 1)"})

    # Running.
    device: Optional[str] = field(default=None, metadata={"help": "cuda or cpu (default cuda if present)"})
    amp: Optional[str] = field(default=None, metadata={
        "help": "autocast dtype: bf16, fp16 or none (default bf16 on CUDA, none on CPU)"})
    compile: bool = field(default=False, metadata={"help": "wrap the model in torch.compile"})
    seed: int = field(default=0, metadata={"help": "random seed (each rank adds its rank)"})
    output_dir: Optional[str] = field(default=None, metadata={
        "help": "where checkpoints and log.txt go (default: none; with --resume, the checkpoint's folder); a "
                "folder that already holds a run is refused unless --resume continues it or --overwrite is given"})
    overwrite: bool = field(default=False, metadata={
        "help": "start a new run in an --output-dir that holds one: its checkpoint.pth and log.txt are moved "
                "to <output_dir>/replaced-<UTC time>/"})
    resume: Optional[str] = field(default=None, metadata={
        "help": "checkpoint (or output directory) to continue; flags not given are the checkpoint's. 'auto': "
                "continue the run in --output-dir if it holds a complete checkpoint, else start a new one there "
                "(one command line for the first start and every restart)"})
    eval: bool = field(default=False, metadata={"help": "only evaluate (with --resume or --pretrained)"})
    save_every: int = field(default=0, metadata={"help": "also save a checkpoint every N steps (0 = per epoch)"})
    max_steps: Optional[int] = field(default=None, metadata={"help": "stop after this many steps in total"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar per epoch"})
    stop_signals: str = field(default="TERM", metadata={
        "help": "signals (comma-separated: TERM, USR1, USR2, INT, HUP; or 'none') on which every process "
                "finishes its current step, the run saves a checkpoint at that step and exits with status 3"})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown TrainConfig fields: {unknown}")
        return cls(**d)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def validate(self) -> "TrainConfig":
        """Raise ValueError naming the flag for values that cannot work."""
        def bad(name, why):
            raise ValueError(f"--{name.replace('_', '-')}: {why}")
        if self.batch_size < 1:
            bad("batch_size", f"must be >= 1; got {self.batch_size}")
        if self.epochs < 1 and not self.eval:
            bad("epochs", f"must be >= 1; got {self.epochs}")
        if not 0.0 < self.sampling_ratio <= 1.0:
            bad("sampling_ratio", f"must be in (0, 1]; got {self.sampling_ratio}")
        if self.amp is not None and self.amp not in AMP_CHOICES:
            bad("amp", f"must be one of {AMP_CHOICES}; got {self.amp!r}")
        if self.train_interpolation not in ("bicubic", "bilinear"):
            bad("train_interpolation", f"must be bicubic or bilinear; got {self.train_interpolation!r}")
        for name in ("drop", "drop_path", "reprob", "mixup_prob", "mixup_switch_prob", "smoothing"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                bad(name, f"must be in [0, 1]; got {getattr(self, name)}")
        if self.eval and not (self.resume or self.pretrained):
            bad("eval", "needs weights: pass --resume PATH or --pretrained PATH")
        if self.save_every < 0:
            bad("save_every", f"must be >= 0; got {self.save_every}")
        if self.data_path and self.synthetic:
            bad("synthetic", "cannot be combined with --data-path")
        if not self.lr > 0:
            bad("lr", f"must be > 0; got {self.lr}")
        for name in ("warmup_epochs", "warmup_lr", "min_lr", "weight_decay", "digits_shift", "mixup", "cutmix"):
            if getattr(self, name) < 0:
                bad(name, f"must be >= 0; got {getattr(self, name)}")
        for name in ("max_steps", "threads", "embed_dim", "input_size", "nb_classes"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                bad(name, f"must be >= 1; got {getattr(self, name)}")
        if self.num_workers is not None and self.num_workers < 0:
            bad("num_workers", f"must be >= 0; got {self.num_workers}")
        if self.local_up_to_layer < 0:
            bad("local_up_to_layer", f"must be >= 0; got {self.local_up_to_layer}")
        if self.resume == "auto":
            if not self.output_dir:
                bad("resume", "auto continues the run in --output-dir: give --output-dir")
            if self.overwrite:
                bad("overwrite", "cannot be combined with --resume auto (every restart would move the run aside)")
            if self.eval:
                bad("eval", "needs the checkpoint to evaluate: --resume PATH, not --resume auto")
        parse_stop_signals(self.stop_signals)
        choices = gpsa_backend_choices()
        if self.gpsa_backend not in choices:
            bad("gpsa_backend", f"must be one of {choices}; got {self.gpsa_backend!r}")
        return self


# The embedded default run: scikit-learn digits (8x8 grey, 10 classes) on a 2-core CPU in < 3 min.
DIGITS_PRESET = dict(
    model="convit_digits", input_size=8, local_up_to_layer=4, drop_path=0.0, batch_size=32, epochs=80,
    lr=3e-3, unscale_lr=True, weight_decay=0.05, warmup_epochs=1, warmup_lr=1e-5, min_lr=1e-5,
    sched_on_updates=True, aa="none", color_jitter=0.0, reprob=0.0, mixup=0.0, cutmix=0.0, smoothing=0.1,
    repeated_aug=False, digits_shift=0,
)


STOP_SIGNAL_NAMES = ("TERM", "USR1", "USR2", "INT", "HUP")


def parse_stop_signals(text: str) -> tuple:
    """``--stop-signals`` text -> tuple of ``signal.Signals`` (empty for 'none'); ValueError naming
    the flag for an unknown name. Accepts 'TERM' and 'SIGTERM', any case."""
    import signal
    if not isinstance(text, str):
        raise TypeError(f"--stop-signals: expected a string such as 'TERM,USR1'; got {type(text).__name__}")
    if text.strip().lower() in ("", "none"):
        return ()
    found = []
    for part in text.split(","):
        name = part.strip().upper()
        name = name[3:] if name.startswith("SIG") else name
        if name not in STOP_SIGNAL_NAMES or not hasattr(signal, "SIG" + name):
            raise ValueError(f"--stop-signals: {part.strip()!r} is not one of {', '.join(STOP_SIGNAL_NAMES)} "
                             "(or 'none')")
        sig = getattr(signal, "SIG" + name)
        if sig not in found:
            found.append(sig)
    return tuple(found)


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false; got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    """One flag per TrainConfig field; defaults are SUPPRESSed so we know which flags were given."""
    parser = argparse.ArgumentParser(
        prog="convit-train", argument_default=argparse.SUPPRESS,
        description="Train or evaluate ConViT (DeiT recipe). With no arguments: a small ConViT on "
                    "scikit-learn's digits, on the CPU, in a few minutes. Defaults are the ImageNet recipe "
                    "(with --data-path or --synthetic); without --data-path the digits preset replaces them "
                    "for the flags not given: both are shown as '(default X; digits Y)'.")
    for f in fields(TrainConfig):
        names = [f"--{f.name}"]
        if "_" in f.name:
            names.append(f"--{f.name.replace('_', '-')}")
        help_text = f.metadata.get("help", "")
        shown = []
        if f.default is not None:
            shown.append(f"default {f.default}")
        if f.name in DIGITS_PRESET and DIGITS_PRESET[f.name] != f.default:
            shown.append(f"digits {DIGITS_PRESET[f.name]}")
        if shown:
            help_text += f" ({'; '.join(shown)})"
        if f.type in ("bool", bool):
            # --flag turns it on; --flag false / --no-flag turn it off.
            parser.add_argument(*names, dest=f.name, nargs="?", const=True, type=_parse_bool, help=help_text)
            parser.add_argument(f"--no-{f.name.replace('_', '-')}", dest=f.name, action="store_false",
                                help=argparse.SUPPRESS)
            continue
        kind = {"int": int, "float": float, "str": str, "Optional[int]": int, "Optional[float]": float,
                "Optional[str]": str}[f.type]
        kwargs = {}
        if f.name == "amp":
            kwargs["choices"] = AMP_CHOICES
        elif f.name == "gpsa_backend":
            kwargs["choices"] = gpsa_backend_choices()
        parser.add_argument(*names, dest=f.name, type=kind, help=help_text, **kwargs)
    return parser


# Fields that say how this invocation runs rather than what is trained: with --resume they are
# never taken from the checkpoint's saved config (a first run's --max_steps 3 must not stop the
# continuation, nor its --device pin the next machine).
RUN_FIELDS = ("resume", "eval", "output_dir", "overwrite", "max_steps", "progress", "save_every", "device",
              "amp", "compile", "num_workers", "threads", "gpsa_backend", "pretrained", "strict_data",
              "stop_signals")


def parse_config(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """Flags -> resolved TrainConfig (the digits preset fills the fields not given, on the digits).

    With ``--resume``, the fields not given are the checkpoint's saved config (``resolve_resumed``),
    so ``convit-train --resume DIR`` continues the run as it was started; given flags override it
    (``convit.train`` then refuses the changes it cannot honour).
    """
    given = vars(build_parser().parse_args(argv))
    if given.get("resume") == "auto":
        # The run in --output-dir, if it holds one (train() finds the same file again and logs it).
        from .train_state import find_resumable, load_training_checkpoint
        if not given.get("output_dir"):
            raise ValueError("--resume: auto continues the run in --output-dir: give --output-dir")
        if given.get("overwrite"):
            raise ValueError("--overwrite: cannot be combined with --resume auto (every restart would move the run "
                             "aside)")
        found = find_resumable(given["output_dir"])
        if found.path is None:
            return resolve(given)
        return resolve_resumed(given, load_training_checkpoint(found.path, mmap=True)["config"])
    if given.get("resume"):
        from .train_state import load_training_checkpoint, resume_path
        saved = load_training_checkpoint(resume_path(given["resume"]), mmap=True)["config"]
        return resolve_resumed(given, saved)
    return resolve(given)


def resolve(given: dict) -> TrainConfig:
    """TrainConfig from the explicitly given fields, with the digits preset under them when it applies."""
    base = {}
    if not given.get("data_path") and not given.get("synthetic"):
        base.update(DIGITS_PRESET)
    base.update(given)
    return TrainConfig.from_dict(base).validate()


def resolve_resumed(given: dict, saved: dict) -> TrainConfig:
    """TrainConfig of a resumed run: the checkpoint's ``saved`` config (less ``RUN_FIELDS``) under
    the explicitly ``given`` fields. Fields a checkpoint of an older version lacks keep their default."""
    names = {f.name for f in fields(TrainConfig)}
    base = {k: v for k, v in dict(saved).items() if k in names and k not in RUN_FIELDS}
    base.update(given)
    return TrainConfig.from_dict(base).validate()
