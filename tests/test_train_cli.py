"""convit-train as a user meets it: a run is never lost (an output folder holding one is refused;
--overwrite moves it aside), resuming says and does the same thing (changed schedule flags rebuild
the schedule, architecture and data-order changes are refused by name, a finished run says so, the
log holds each epoch once), bad input ends in one ``convit-train: error:`` line, unreadable images
are counted per file in training and validation, and the defaults for threads and the help text.
Small runs: 20% of the digits (8 steps of 32 per epoch), a 32-wide model."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

import convit
import convit.train as train_mod
from convit.config import DIGITS_PRESET, TrainConfig, build_parser, parse_config, resolve
from convit.data import UnreadableImageError, scan_image_folder
from convit.optim import WarmupCosineSchedule
from convit.samplers import TrainSampler
from convit.train_state import load_training_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--sampling_ratio", "0.2", "--embed_dim", "32", "--progress", "false", "--seed", "1"]


def run_cli(capsys, *argv):
    """(exit status, stdout, stderr) of ``convit-train argv`` in this process."""
    capsys.readouterr()
    rc = train_mod.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error_line(err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("convit-train: error: "), err[-2000:]
    return lines[0]


def log_epochs(folder):
    return [json.loads(line)["epoch"] for line in open(os.path.join(folder, "log.txt"))]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 2-epoch run, made through the command line; tests copy it before changing it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert train_mod.main(["--epochs", "2", "--output-dir", str(out), *SMALL]) == 0
    return out


def copy_run(src, dst):
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------ 1. never lose a run
def test_output_dir_with_a_run_is_refused_unless_resume_or_overwrite(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path / "run")
    ckpt, log = (run / "checkpoint.pth").read_bytes(), (run / "log.txt").read_bytes()
    rc, out, err = run_cli(capsys, "--epochs", "1", "--output-dir", run, *SMALL)
    line = one_error_line(err)
    assert rc == 2 and "already holds a run" in line and "--resume" in line and "--overwrite" in line
    assert "epoch 2 of 2" in line
    assert (run / "checkpoint.pth").read_bytes() == ckpt and (run / "log.txt").read_bytes() == log

    # --overwrite starts over and moves the old run aside, intact. --max_steps stops mid-epoch,
    # which must still report the throughput (item 10).
    rc, out, err = run_cli(capsys, "--epochs", "1", "--output-dir", run, "--overwrite", "--max_steps", "3", *SMALL)
    assert rc == 0, err
    moved = [d for d in os.listdir(run) if d.startswith("replaced-")]
    assert len(moved) == 1 and "moved the previous run" in out
    assert (run / moved[0] / "checkpoint.pth").read_bytes() == ckpt
    assert (run / moved[0] / "log.txt").read_bytes() == log
    assert load_training_checkpoint(str(run / "checkpoint.pth"))["global_step"] == 3
    assert re.search(r"stopped after step 3 .*\d+ training img/s", out), out
    # --overwrite together with --resume of the same folder is a contradiction, not a guess.
    rc, _, err = run_cli(capsys, "--resume", run, "--output-dir", run, "--overwrite")
    assert rc == 2 and "--overwrite" in one_error_line(err)


# -------------------------------------------- 2. changed hyper-parameters on resume are honoured
def test_resume_with_more_epochs_and_new_lr_rebuilds_the_schedule(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path / "run")
    # Epoch 2 of a schedule stretched to 4 epochs (--max_steps: the run stops at the end of it).
    rc, out, err = run_cli(capsys, "--resume", run, *SMALL, "--epochs", "4", "--lr", "0.01", "--max_steps", "24",
                           "--weight-decay", "0.1")
    assert rc == 0, err
    assert "schedule rebuilt" in out and "base lr 0.01" in out and "--weight-decay 0.1 (was 0.05)" in out
    state = load_training_checkpoint(str(run / "checkpoint.pth"))
    # The saved config is what ran: the new values, and the flags not given are the first run's.
    assert state["config"]["epochs"] == 4 and state["config"]["lr"] == 0.01
    assert state["config"]["embed_dim"] == 32 and state["config"]["sampling_ratio"] == 0.2
    assert state["scheduler"]["epochs"] == 4 and state["scheduler"]["base_lr"] == 0.01
    assert state["resumes"] == [{"epoch": 2, "step_in_epoch": 0, "global_step": 16,
                                 "changed": {"epochs": [2, 4], "lr": [DIGITS_PRESET["lr"], 0.01],
                                             "weight_decay": [DIGITS_PRESET["weight_decay"], 0.1]}}]
    # An other field is applied, not only recorded: the optimizer's decayed group uses the new value.
    assert [g["weight_decay"] for g in state["optimizer"]["param_groups"]] == [0.0, 0.1]
    # The lr used in epoch 2 is the new schedule's (digits preset: updated every step, 8 per epoch).
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
    fresh = WarmupCosineSchedule(opt, 0.01, 4, DIGITS_PRESET["warmup_epochs"], DIGITS_PRESET["warmup_lr"],
                                 DIGITS_PRESET["min_lr"])
    last = json.loads(open(run / "log.txt").read().splitlines()[-1])
    assert last["epoch"] == 2 and last["train_lr"] == pytest.approx(fresh.lr_at(2 + 7 / 8), rel=1e-12)
    assert last["train_lr"] > 100 * DIGITS_PRESET["min_lr"]  # the old schedule was at its floor, min_lr
    assert log_epochs(run) == [0, 1, 2]


def test_resume_refuses_what_it_cannot_honour(finished_run, capsys):
    for flags, named in ((["--batch-size", "16"], "--batch-size"), (["--seed", "5"], "--seed"),
                         (["--epochs", "1"], "--epochs")):
        rc, _, err = run_cli(capsys, "--resume", finished_run, "--epochs", "2", *SMALL, *flags)
        assert rc == 2 and named in one_error_line(err), flags


def test_resume_takes_the_flags_not_given_from_the_checkpoint(finished_run):
    from convit.config import RUN_FIELDS
    saved = load_training_checkpoint(str(finished_run / "checkpoint.pth"))["config"]
    resumed = parse_config(["--resume", str(finished_run)]).to_dict()
    assert resumed["embed_dim"] == 32 and resumed["epochs"] == 2 and resumed["sampling_ratio"] == 0.2
    assert {k: v for k, v in resumed.items() if k not in RUN_FIELDS} == {
        k: v for k, v in saved.items() if k not in RUN_FIELDS}


# -------------------------------------------- 3. architecture flags are compared, not tracebacks
@pytest.mark.parametrize("flags", [["--embed-dim", "16"], ["--local_up_to_layer", "2"],
                                   ["--local_up_to_layer", "2", "--eval"]])
def test_resume_with_other_architecture_names_the_flag(finished_run, capsys, flags):
    rc, _, err = run_cli(capsys, "--resume", finished_run, "--epochs", "2", *SMALL, *flags)
    line = one_error_line(err)
    assert rc == 2 and flags[0].replace("_", "-") in line and "checkpoint" in line


# ------------------------------------------------------- 4. and 5. unreadable images
def _write_tree(root, train_per_class=6, corrupt_val=False):
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", train_per_class), ("val", 2)):
        for cls in ("cat", "dog"):
            os.makedirs(root / split / cls)
            for i in range(n):
                pixels = torch.randint(0, 256, (20, 24, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")
    (root / "train" / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    if corrupt_val:
        (root / "val" / "dog" / "bad_val.png").write_bytes(b"not an image at all")
    return root


IMAGEFOLDER = ["--model", "convit_tiny", "--input-size", "32", "--embed-dim", "32", "--batch-size", "4",
               "--progress", "false", "--warmup-epochs", "0"]


def test_strict_data_checks_every_file_first_and_fails_in_one_line(tmp_path, capsys):
    root = _write_tree(tmp_path / "data")
    out = tmp_path / "out"
    rc, _, err = run_cli(capsys, "--data-path", root, "--strict-data", "--output-dir", out, "--epochs", "2",
                         "--num-workers", "0", *IMAGEFOLDER)
    line = one_error_line(err)
    assert rc == 2 and "broken.png" in line and "1 of 17 images" in line
    assert not (out / "checkpoint.pth").exists()  # refused before any training


def test_error_raised_in_a_dataloader_worker_becomes_one_line():
    class Bad(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            raise UnreadableImageError("cannot read image '/x/y.png': broken data stream")

    with pytest.raises(UnreadableImageError) as info:
        next(iter(torch.utils.data.DataLoader(Bad(), num_workers=1)))
    assert "Traceback" in str(info.value)  # what the worker sends back: its whole traceback
    assert train_mod._one_line(info.value) == "cannot read image '/x/y.png': broken data stream"


def test_unreadable_images_counted_per_file_in_training_and_validation(tmp_path, capsys):
    root = _write_tree(tmp_path / "data", corrupt_val=True)
    # A seed whose repeated-augmentation order draws the broken file more than once in epoch 0's
    # 3 batches of 4, so that counting draws and counting files differ.
    samples, _ = scan_image_folder(str(root / "train"))
    broken = [p.endswith("broken.png") for p, _ in samples].index(True)
    seed = next(s for s in range(100)
                if TrainSampler(len(samples), seed=s, repeats=3).indices(0)[:12].count(broken) >= 2)
    out = tmp_path / "out"
    rc, stdout, err = run_cli(capsys, "--data-path", root, "--output-dir", out, "--epochs", "1", "--seed", seed,
                              "--num-workers", "0", "--repeated-aug", *IMAGEFOLDER)
    assert rc == 0, err
    record = json.loads(open(out / "log.txt").readline())
    assert record["skipped_images"] == 1 and record["skipped_paths"][0].endswith("broken.png")
    assert record["test_images"] == 4 and record["test_unreadable_images"] == 1
    assert "on 4 of 5 validation images" in stdout and "1 unreadable training image(s)" in stdout
    assert err.count("broken.png") == 1 and err.count("bad_val.png") == 1


# ------------------------------------------------------------- 6. one log line per epoch
def test_kill_between_log_and_checkpoint_does_not_duplicate_the_epoch(tmp_path, monkeypatch, capsys):
    real_save = train_mod.save_checkpoint

    class Killed(BaseException):
        pass

    def save_then_die(path, state):
        if state["epoch"] == 2 and state["step_in_epoch"] == 0:
            raise Killed  # after epoch 1's log line, before its checkpoint
        real_save(path, state)

    monkeypatch.setattr(train_mod, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        train_mod.main(["--epochs", "2", "--output-dir", str(tmp_path), *SMALL])
    assert log_epochs(tmp_path) == [0, 1]
    assert load_training_checkpoint(str(tmp_path / "checkpoint.pth"))["epoch"] == 1
    monkeypatch.setattr(train_mod, "save_checkpoint", real_save)
    rc, out, err = run_cli(capsys, "--resume", tmp_path, "--epochs", "2", *SMALL)
    assert rc == 0, err
    assert "dropped 1 line(s)" in out
    assert log_epochs(tmp_path) == [0, 1]


# -------------------------------------------------------------- 7. messages that say the truth
def test_non_finite_loss_before_any_checkpoint_says_so(tmp_path, monkeypatch):
    real_build = train_mod.build_model

    def build_poisoned(*args, **kwargs):
        model = real_build(*args, **kwargs)
        model.register_forward_hook(lambda m, i, o: o * float("nan"))
        return model

    monkeypatch.setattr(train_mod, "build_model", build_poisoned)
    with pytest.raises(train_mod.NonFiniteLossError) as info:
        train_mod.train(resolve(dict(epochs=1, sampling_ratio=0.2, embed_dim=32, progress=False,
                                     output_dir=str(tmp_path))))
    assert "no checkpoint had been written yet" in str(info.value) and "is kept" not in str(info.value)
    assert not (tmp_path / "checkpoint.pth").exists()


def test_eval_and_finished_run_report_the_checkpoint(finished_run, capsys):
    rc, out, err = run_cli(capsys, "--eval", "--resume", finished_run, *SMALL)
    assert rc == 0, err
    assert "saved at epoch 2, batch 0, step 16" in out and "epoch 0, batch 0, step 0" not in out
    rc, out, err = run_cli(capsys, "--resume", finished_run, "--epochs", "2", *SMALL)
    assert rc == 0, err
    best = load_training_checkpoint(str(finished_run / "checkpoint.pth"))["best_acc1"]
    assert "nothing to train" in out and f"best Acc@1 {best:.2f}%" in out and "--epochs" in out


def test_a_file_that_is_not_a_checkpoint_says_what_it_is(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("hello, not weights\n")
    with pytest.raises(ValueError, match=r"not a torch checkpoint.*starts with b'hello, n'"):
        convit.load_checkpoint(convit.create_model("convit_tiny"), text)
    with pytest.raises(ValueError, match="not a torch checkpoint"):
        load_training_checkpoint(str(text))
    from convit.analyze import main as analyze_main
    capsys.readouterr()
    assert analyze_main([str(text), "--output-dir", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "not a torch checkpoint" in err and "KeyError" not in err and len(err.strip().splitlines()) == 1


# ---------------------------------------------------- 8. argument errors, not tracebacks
@pytest.mark.parametrize("argv, named", [(["--device", "tpu"], "--device"), (["--device", "cuda:x"], "--device"),
                                         (["--warmup-epochs", "-1"], "--warmup-epochs"),
                                         (["--lr", "0"], "--lr"), (["--threads", "0"], "--threads")])
def test_bad_arguments_are_one_line_errors(capsys, argv, named):
    rc, _, err = run_cli(capsys, *argv, "--epochs", "1")
    assert rc == 2 and named in one_error_line(err)


def test_gpsa_backend_choices_follow_convit_kernels(capsys):
    from convit_kernels.backends import KNOWN_BACKENDS
    action = next(a for a in build_parser()._actions if a.dest == "gpsa_backend")
    assert tuple(action.choices) == ("auto",) + tuple(KNOWN_BACKENDS)
    with pytest.raises(SystemExit):
        parse_config(["--gpsa-backend", "fastest"])
    with pytest.raises(ValueError, match="--gpsa-backend"):
        resolve({"gpsa_backend": "fastest"})


def test_analyze_without_matplotlib_names_the_extra(tmp_path):
    # A fresh interpreter where importing matplotlib fails, as on a [train]-only install.
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from convit.analyze import main\n"
            "sys.exit(main(['--model', 'convit_tiny', '--output-dir', 'a']))")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(convit.__file__))))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("convit-analyze: error:") and '".[analysis]"' in lines[0]


# ------------------------------------------------------------------------- 9. threads
def test_thread_defaults(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    digits = train_mod.resolve_runtime(resolve({}))
    assert digits.threads == 1 and digits.num_workers == 0
    assert train_mod.resolve_runtime(resolve({"threads": 2})).threads == 2
    for cores, workers, threads in ((2, 2, 1), (16, 10, 6), (64, 10, 54)):
        monkeypatch.setattr(train_mod, "available_cores", lambda: cores)
        monkeypatch.setattr(os, "cpu_count", lambda: cores)
        folder = train_mod.resolve_runtime(resolve({"data_path": "/data"}))
        assert (folder.num_workers, folder.threads) == (workers, threads), cores
        synthetic = train_mod.resolve_runtime(resolve({"synthetic": True}))
        assert (synthetic.num_workers, synthetic.threads) == (0, cores)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun: 8 processes share the 64 cores
    assert train_mod.resolve_runtime(resolve({"synthetic": True})).threads == 8
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's word wins (torch read it at start-up)
    assert train_mod.resolve_runtime(resolve({})).threads == torch.get_num_threads()


def test_run_logs_its_threads_and_restores_them(finished_run, capsys):
    before = torch.get_num_threads()
    rc, out, _ = run_cli(capsys, "--eval", "--resume", finished_run, "--threads", "1")
    assert rc == 0 and "threads: 1 torch intra-op thread(s) (--threads)" in out
    assert torch.get_num_threads() == before


# ------------------------------------------------------------------- 10. help and README
def test_help_shows_imagenet_defaults_and_digits_preset():
    text = " ".join(build_parser().format_help().split())
    assert "(default 300; digits 80)" in text and "(default 64; digits 32)" in text
    assert "digits convit_digits" in text


def test_readme_first_command_trains_into_the_folder_the_analysis_reads():
    readme = open(os.path.join(REPO, "README.md")).read()
    first = next(line for line in readme.splitlines() if "convit-train" in line and not line.startswith("#"))
    argv = first.split("convit-train", 1)[1].split("&&")[0].split()
    config = parse_config(argv)
    assert config.output_dir, f"README command 1 saves no checkpoint: {first}"
    section = readme.split("## Locality analysis", 1)[1].split("\n## ", 1)[0]
    assert f"convit-analyze {config.output_dir}/checkpoint.pth" in section
    assert config == TrainConfig.from_dict(dict(resolve({}).to_dict(), output_dir=config.output_dir))
