"""Training that survives the faults of a cluster, on the CPU with a tiny digits run (2 epochs of 8
steps, a 32-wide model, every stochastic part of the recipe on, an EMA):

- under ``torchrun`` (gloo), a stop signal to one rank, then a rank SIGKILLed mid-epoch: the
  restarted run completes by itself with exactly the weights, EMA and log of an uninterrupted run;
- SIGTERM mid-epoch: the process finishes its step, saves there, exits with status 3, and
  ``--resume auto`` ends exactly where the uninterrupted run ends;
- signals during the checkpoint write corrupt nothing;
- ``--resume auto`` on an empty folder, a finished run, a truncated checkpoint (with and without
  a previous one), a log without a checkpoint, and with changed flags.

Faults are injected at a given step by ``FAULT_RUNNER`` (a script wrapping ``convit.train.main``),
so each test is deterministic.
"""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

import convit
import convit.train as train_mod
from convit.train_state import CHECKPOINT_NAME, PREVIOUS_NAME, load_training_checkpoint

ARGS = ["--epochs", "2", "--batch-size", "32", "--sampling_ratio", "0.2", "--embed_dim", "32", "--warmup-epochs",
        "0.5", "--progress", "false", "--drop-path", "0.1", "--mixup", "0.8", "--cutmix", "1.0", "--reprob", "0.25",
        "--digits_shift", "1", "--seed", "1", "--model-ema", "--model-ema-decay", "0.9"]

# Runs convit.train.main(argv). CONVIT_TEST_FAULT="<SIGNAL>@<epoch>.<batch>[:<rank>],..." : the n-th
# entry applies to attempt n (TORCHELASTIC_RESTART_COUNT): that rank sends itself the signal as
# that training step begins (PG<SIGNAL>: to its whole process group, DataLoader workers included).
FAULT_RUNNER = '''
import os, signal, sys
import convit.train as train_mod
faults = [f for f in os.environ.get("CONVIT_TEST_FAULT", "").split(",") if f]
attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
if attempt < len(faults):
    name, _, where = faults[attempt].partition("@")
    when, _, rank = where.partition(":")
    epoch, batch = (int(v) for v in when.split("."))
    if int(os.environ.get("RANK", "0")) == int(rank or 0):
        real = train_mod.mix_seed
        def faulty_mix_seed(seed, rank, e, i):  # called once as every training step begins
            if (e, i) == (epoch, batch) and name.startswith("PG"):  # the whole process group, as torchrun
                os.killpg(0, getattr(signal, "SIG" + name[2:]))
            elif (e, i) == (epoch, batch):
                os.kill(os.getpid(), getattr(signal, "SIG" + name))
            return real(seed, rank, e, i)
        train_mod.mix_seed = faulty_mix_seed
sys.exit(train_mod.main(sys.argv[1:]))
'''


def _env(**extra):
    """The subprocesses run the very code this process imported (see test_train_run's SIGKILL test)."""
    return dict(os.environ, OMP_NUM_THREADS="1", **extra, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(os.path.abspath(convit.__file__)))]
        + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))


def _runner(tmp_path):
    path = tmp_path / "fault_runner.py"
    path.write_text(FAULT_RUNNER)
    return str(path)


def _state(folder, name=CHECKPOINT_NAME):
    return load_training_checkpoint(str(folder / name))


def _log(folder):
    """log.txt without its wall-clock field (throughput differs between any two runs)."""
    lines = [json.loads(line) for line in (folder / "log.txt").read_text().splitlines()]
    for line in lines:
        line.pop("train_images_per_s")
    return lines


def assert_same_end_state(run, reference):
    """Weights, EMA, step and log of ``run`` equal ``reference``'s, bit for bit."""
    got, want = _state(run), _state(reference)
    assert got["global_step"] == want["global_step"] and got["epoch"] == want["epoch"]
    for part in ("model", "model_ema"):
        assert got[part].keys() == want[part].keys()
        diff = [k for k in want[part] if not torch.equal(got[part][k], want[part][k])]
        assert not diff, f"{part} differs in {diff[:5]}"
    assert _log(run) == _log(reference)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    assert train_mod.main(ARGS + ["--output-dir", str(out)]) == 0
    assert _state(out)["global_step"] == 16
    return out


# ------------------------------------------------------------------------------ a lost rank
def test_torchrun_restarts_after_a_stop_signal_and_a_killed_rank_match_an_uninterrupted_run(tmp_path):
    """Two processes under ``torchrun --max-restarts=2``, 9 steps of 16 images each per epoch.
    Attempt 0: rank 1 alone gets SIGTERM as step 5 begins; both ranks stop after that step (they
    agree in the loss all-reduce), rank 0 saves it, both exit with status 3. Attempt 1 continues
    from step 5; rank 1 SIGKILLs itself as step 14 begins (epoch 1, batch 4), after the
    --save-every checkpoint of step 12. Attempt 2 continues from step 12 and finishes. The end
    state is the uninterrupted two-process run's, bit for bit."""
    runner = _runner(tmp_path)
    args = ARGS + ["--batch-size", "16", "--save-every", "3", "--resume", "auto"]

    def torchrun(out, fault):
        return subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "--max-restarts=2",
             "--monitor-interval=0.1", runner, *args, "--output-dir", str(out)],
            cwd=tmp_path, env=_env(CONVIT_TEST_FAULT=fault), capture_output=True, text=True, timeout=600)

    reference = torchrun(tmp_path / "reference", "")
    assert reference.returncode == 0, reference.stderr[-3000:]
    faulty = torchrun(tmp_path / "faulty", "TERM@0.4:1,KILL@1.4:1")
    assert faulty.returncode == 0, faulty.stderr[-3000:]
    said = faulty.stdout
    assert "--resume auto: no checkpoint" in said
    # Rank 0 got no signal, yet stopped after the same step as rank 1 and saved it.
    assert "stopped by a stop signal on another rank after step 5 (epoch 0, batch 5 of 9)" in said, said[-3000:]
    assert "failed (exitcode: 3)" in faulty.stderr, faulty.stderr[-3000:]  # torchrun names the first to exit
    assert "(epoch 0 of 2, batch 5, step 5)" in said
    # The SIGKILLed rank: continued from the last checkpoint, not from scratch.
    assert "failed (exitcode: -9) local_rank: 1" in faulty.stderr, faulty.stderr[-3000:]
    assert "(epoch 1 of 2, batch 3, step 12)" in said, said[-3000:]
    assert _state(tmp_path / "faulty")["world_size"] == 2 and _state(tmp_path / "faulty")["global_step"] == 18
    assert_same_end_state(tmp_path / "faulty", tmp_path / "reference")


# ------------------------------------------------------------------------------- preemption
def test_sigterm_mid_epoch_saves_that_step_and_resume_auto_matches(uninterrupted, tmp_path):
    """SIGTERM to the process group (as torchrun sends it) as step 5 begins; the DataLoader worker
    gets it too and must survive it (here, forked, by the handler it inherited, which stays silent;
    a spawned worker ignores it through the worker_init_fn), since the run still reads from it."""
    runner, out = _runner(tmp_path), tmp_path / "run"
    args = ARGS + ["--output-dir", str(out), "--resume", "auto"]
    proc = subprocess.run([sys.executable, runner, *args, "--num-workers", "1"], cwd=tmp_path,
                          env=_env(CONVIT_TEST_FAULT="PGTERM@0.4"), capture_output=True, text=True, timeout=600,
                          start_new_session=True)
    assert proc.returncode == train_mod.EXIT_STOPPED == 3, proc.stderr[-3000:]
    stops = [line for line in proc.stdout.splitlines() if line.startswith("stopped by SIGTERM")]
    assert len(stops) == 1 and "after step 5 (epoch 0, batch 5 of 8)" in stops[0] and "--resume auto" in stops[0]
    assert proc.stderr.count("SIGTERM received") == 1, proc.stderr[-3000:]
    state = _state(out)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (0, 5, 5)
    assert not (out / "log.txt").exists()  # no epoch ended
    rc = train_mod.main(args)
    assert rc == 0
    assert_same_end_state(out, uninterrupted)


def test_signals_during_the_checkpoint_write_corrupt_nothing(uninterrupted, tmp_path, monkeypatch, capfd):
    """A SIGTERM arrives while the step-7 checkpoint (--save-every 7) is being written: the write
    completes, step 8 (the epoch's last) is the agreed stop step, and a second SIGTERM and a
    SIGUSR1 arrive while step 8's checkpoint is written. Both checkpoints are complete (7 the
    previous, 8 the current), no temporary file is left, and the resumed run matches."""
    class ReachedDefault(BaseException):
        pass

    def fail(signum, frame):  # reached only if convit-train did not handle the signal; pytest survives
        raise ReachedDefault(signal.Signals(signum).name)

    real_save = torch.save
    saves = []

    def save_then_signal(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        if isinstance(obj, dict) and "model" in obj:
            saves.append(obj["global_step"])
            os.kill(os.getpid(), signal.SIGTERM)  # the file is written, not yet synced nor renamed
            if len(saves) == 2:
                os.kill(os.getpid(), signal.SIGUSR1)

    out = tmp_path / "run"
    args = ARGS + ["--output-dir", str(out), "--resume", "auto", "--stop-signals", "TERM,USR1"]
    monkeypatch.setattr(torch, "save", save_then_signal)
    previous = {signum: signal.signal(signum, fail) for signum in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        rc = train_mod.main(args + ["--save-every", "7"])
    finally:
        monkeypatch.setattr(torch, "save", real_save)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    err = capfd.readouterr().err
    assert rc == 3 and saves == [7, 8], (rc, saves)
    assert "SIGTERM received again" in err and "SIGUSR1 received again" in err
    assert (_state(out)["epoch"], _state(out)["step_in_epoch"], _state(out)["global_step"]) == (0, 8, 8)
    assert _state(out, PREVIOUS_NAME)["global_step"] == 7
    assert sorted(os.listdir(out)) == [PREVIOUS_NAME, CHECKPOINT_NAME]
    # What a SIGKILL in the middle of a save leaves: its temporary file, removed at the next start.
    (out / ".checkpoint.pth.tmp.999999").write_bytes(b"PK\x03\x04 torn")
    assert train_mod.main(args) == 0  # resumes at batch 8 of 8: evaluates epoch 0, trains epoch 1
    assert "removed 1 temporary file(s) of interrupted checkpoint saves" in capfd.readouterr().out
    assert sorted(os.listdir(out)) == [PREVIOUS_NAME, CHECKPOINT_NAME, "log.txt"]
    assert_same_end_state(out, uninterrupted)


# ------------------------------------------------------------------------------ --resume auto
def test_resume_auto_on_an_empty_folder_starts_a_new_run(tmp_path, capsys):
    for out in (tmp_path / "new", tmp_path / "empty"):
        if out.name == "empty":
            out.mkdir()
        capsys.readouterr()
        assert train_mod.main(ARGS + ["--output-dir", str(out), "--resume", "auto", "--max_steps", "2"]) == 0
        said = capsys.readouterr().out
        assert f"--resume auto: no checkpoint in {out}; starting a new run there" in said
        assert _state(out)["global_step"] == 2


def test_resume_auto_on_a_finished_run_trains_nothing(uninterrupted, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    before = {name: (run / name).read_bytes() for name in os.listdir(run)}
    capsys.readouterr()
    assert train_mod.main(["--output-dir", str(run), "--resume", "auto"]) == 0
    said = capsys.readouterr().out
    assert "continuing the run in" in said and "(epoch 2 of 2, batch 0, step 16)" in said
    assert "nothing to train" in said
    assert {name: (run / name).read_bytes() for name in os.listdir(run)} == before


def test_resume_auto_keeps_the_checks_of_resume(uninterrupted, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    for flags, named in ((["--embed-dim", "16"], "--embed-dim"), (["--seed", "5"], "--seed"),
                         (["--batch-size", "16"], "--batch-size")):
        capsys.readouterr()
        assert train_mod.main(["--output-dir", str(run), "--resume", "auto", *flags]) == 2, flags
        err = capsys.readouterr().err
        assert named in err and "convit-train: error:" in err, (flags, err)
    capsys.readouterr()
    assert train_mod.main(["--output-dir", str(run), "--resume", "auto", "--epochs", "3", "--lr", "0.01",
                           "--max_steps", "17"]) == 0
    said = capsys.readouterr().out
    assert "schedule rebuilt for --epochs 3 (was 2), --lr 0.01" in said
    assert _state(run)["global_step"] == 17 and _state(run)["config"]["embed_dim"] == 32
    assert _state(run, PREVIOUS_NAME)["global_step"] == 16


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run stopped at step 5 (--max_steps) with --save-every 2: checkpoint.pth at step 5, the
    previous one at step 4."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    assert train_mod.main(ARGS + ["--output-dir", str(out), "--save-every", "2", "--max_steps", "5"]) == 0
    assert _state(out)["global_step"] == 5 and _state(out, PREVIOUS_NAME)["global_step"] == 4
    return out


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return data[: len(data) // 2]


def test_resume_auto_on_a_truncated_checkpoint_falls_back_on_the_previous(uninterrupted, stopped_run, tmp_path,
                                                                          capsys):
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    torn = _truncate(run / CHECKPOINT_NAME)
    capsys.readouterr()
    # --resume DIR names that very checkpoint: refused, pointing at the previous one.
    assert train_mod.main(ARGS + ["--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "is truncated" in err and f"{run / PREVIOUS_NAME}, may be complete" in err, err
    assert train_mod.main(ARGS + ["--output-dir", str(run), "--resume", "auto"]) == 0
    said = capsys.readouterr().out
    assert "is truncated" in said and f"continuing from the previous complete checkpoint {run / PREVIOUS_NAME}" in said
    assert "(epoch 0 of 2, batch 4, step 4)" in said
    # The torn file is kept, moved aside, not rotated into the previous slot nor overwritten.
    moved = [d for d in os.listdir(run) if d.startswith("replaced-")]
    assert len(moved) == 1 and (run / moved[0] / CHECKPOINT_NAME).read_bytes() == torn
    assert_same_end_state(run, uninterrupted)


def test_resume_auto_refuses_a_truncated_checkpoint_without_a_previous_one(stopped_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    os.remove(run / PREVIOUS_NAME)
    torn = _truncate(run / CHECKPOINT_NAME)
    capsys.readouterr()
    assert train_mod.main(ARGS + ["--output-dir", str(run), "--resume", "auto"]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("convit-train: error: --resume auto:"), lines
    assert "truncated" in lines[0] and "no previous checkpoint" in lines[0] and "--overwrite" in lines[0]
    assert sorted(os.listdir(run)) == [CHECKPOINT_NAME] and (run / CHECKPOINT_NAME).read_bytes() == torn


def test_resume_auto_explains_a_log_without_a_checkpoint(uninterrupted, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(uninterrupted / "log.txt", run / "log.txt")
    log = (run / "log.txt").read_bytes()
    capsys.readouterr()
    assert train_mod.main(ARGS + ["--output-dir", str(run), "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert "holds log.txt (2 line(s)) but no checkpoint" in err and "--overwrite" in err
    assert os.listdir(run) == ["log.txt"] and (run / "log.txt").read_bytes() == log


@pytest.mark.parametrize("argv, named", [
    (["--resume", "auto"], "--output-dir"),
    (["--resume", "auto", "--output-dir", "{tmp}", "--overwrite"], "--overwrite"),
    (["--stop-signals", "KILL"], "--stop-signals"),
])
def test_bad_fault_flags_are_one_line_errors(argv, named, tmp_path, capsys):
    capsys.readouterr()
    assert train_mod.main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("convit-train: error: ") and named in err and "\n" not in err, err


def test_stop_signals_record_the_signal_and_restore_the_handlers():
    before = signal.getsignal(signal.SIGUSR2)
    stop = train_mod.StopSignals((signal.SIGUSR2,), announce=False).install()
    try:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR2)
        assert stop.requested and stop.name() == "SIGUSR2"
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGUSR2) is before
    train_mod._ignore_signals((signal.SIGUSR2,))  # what a spawned DataLoader worker runs first
    try:
        assert signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGUSR2, before)
