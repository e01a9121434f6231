"""Reliability: bit-identical reruns, kill-and-resume, failure handling (disk full, corrupted checkpoints)."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import sed_lens.tracking as tracking
from sed_lens.cli import run_cli
from sed_lens.errors import SedLensError
from sed_lens.experiments import grokking
from sed_lens.models import build_model
from sed_lens.tracking import Run, read_jsonl
from sed_lens.training import Callback, TrainConfig, Trainer

FLAGS = ["--p", "11", "--steps", "120", "--eval-every", "10", "--checkpoint-every", "20", "--sed", "update,gradient",
         "--sed-every", "5", "--sed-window", "4", "--wandb-mode", "disabled", "--no-progress"]


def cli(argv, capsys=None):
    try:
        code = run_cli(grokking.main, argv, prog="grokking")
    except SystemExit as e:
        code = e.code
    return code


def rows_without_timing(path):
    return [{k: v for k, v in r.items() if "time" not in k} for r in read_jsonl(path)]


def test_same_config_and_seed_give_identical_metrics_and_sed_directions(tmp_path):
    for name in ("a", "b"):
        assert cli([*FLAGS, "--steps", "40", "--run-dir", str(tmp_path / name)]) == 0
    assert rows_without_timing(tmp_path / "a" / "metrics.jsonl") == rows_without_timing(tmp_path / "b" / "metrics.jsonl")
    a = torch.load(tmp_path / "a" / "sed_bases.pt", weights_only=True)["bases"]
    b = torch.load(tmp_path / "b" / "sed_bases.pt", weights_only=True)["bases"]
    assert set(a) == {"update", "gradient"}
    for k in a:
        assert torch.equal(a[k]["directions"], b[k]["directions"])


def run_until_killed(run_dir: Path, min_step: int | None, timeout: float = 300.0) -> int:
    """Start the CLI in a subprocess and SIGKILL it once metrics.jsonl has reached ``min_step`` (None: as soon
    as the run directory exists, before any checkpoint). Returns the last logged step at the kill."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sed_lens.experiments.grokking", *FLAGS, "--run-dir", str(run_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + timeout
    last = -1
    try:
        while time.time() < deadline and proc.poll() is None:
            metrics = run_dir / "metrics.jsonl"
            if metrics.exists():
                lines = metrics.read_text().splitlines()
                if lines:
                    last = json.loads(lines[-1])["step"]
                if min_step is None or last >= min_step:
                    break
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    return last


@pytest.mark.slow
def test_killed_runs_resume_to_identical_final_metrics(tmp_path):
    assert cli([*FLAGS, "--run-dir", str(tmp_path / "whole")]) == 0
    whole = rows_without_timing(tmp_path / "whole" / "metrics.jsonl")
    bases = torch.load(tmp_path / "whole" / "sed_bases.pt", weights_only=True)["bases"]
    for i, kill_at in enumerate((None, 30, 85)):  # before the first checkpoint, after the first, mid-run
        rd = tmp_path / f"killed{i}"
        run_until_killed(rd, kill_at)
        assert not (rd / "summary.json").exists()
        assert cli(["--resume", str(rd)]) == 0
        assert rows_without_timing(rd / "metrics.jsonl") == whole, kill_at
        again = torch.load(rd / "sed_bases.pt", weights_only=True)["bases"]
        for k in bases:
            assert torch.equal(again[k]["directions"], bases[k]["directions"])
        assert json.loads((rd / "summary.json").read_text())["final"] == \
            json.loads((tmp_path / "whole" / "summary.json").read_text())["final"]


def test_resume_errors(tmp_path, capsys):
    assert cli(["--resume", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli(["--resume", str(tmp_path / "empty")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert cli(["--resume", str(tmp_path / "empty"), "--p", "13"]) == 2
    assert "drop --p" in capsys.readouterr().err
    rd = tmp_path / "r"
    assert cli([*FLAGS, "--steps", "20", "--run-dir", str(rd)]) == 0
    capsys.readouterr()
    ckpt = rd / "checkpoints" / "last.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])  # truncated, as by a crash mid-copy
    assert cli(["--resume", str(rd)]) == 2
    err = capsys.readouterr().err
    assert "truncated or corrupted" in err and str(ckpt) in err and err.count("\n") == 1


def test_a_finished_run_resumes_to_the_same_summary(tmp_path, capsys):
    rd = tmp_path / "done"
    assert cli([*FLAGS, "--steps", "20", "--run-dir", str(rd)]) == 0
    before = json.loads((rd / "summary.json").read_text())
    assert cli(["--resume", str(rd)]) == 0
    after = json.loads((rd / "summary.json").read_text())
    assert after["final"] == before["final"] and after["steps"] == 20
    assert [r["step"] for r in read_jsonl(rd / "metrics.jsonl")] == [0, 10, 20]


def test_no_space_left_keeps_the_previous_checkpoint(tmp_path, monkeypatch, tiny_task):
    with Run(tmp_path / "r", {}, wandb_mode="disabled") as run:
        t = Trainer(build_model("xu2026", tiny_task), tiny_task, TrainConfig(steps=10, eval_every=5, checkpoint_every=5),
                    run=run, progress=False)
        t.fit()
        good = t.checkpoint_path.read_bytes()
        real_fsync = os.fsync

        def full(fd):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(tracking.os, "fsync", full)
        t.train_step()
        with pytest.raises(SedLensError, match="No space left on device.*previous checkpoint is intact"):
            t.save_checkpoint(t.checkpoint_path)
        monkeypatch.setattr(tracking.os, "fsync", real_fsync)
    assert t.checkpoint_path.read_bytes() == good
    assert not [p for p in t.checkpoint_path.parent.iterdir() if p.name.endswith(".tmp")]
    fresh = Trainer(build_model("xu2026", tiny_task, seed=3), tiny_task, TrainConfig(steps=10), progress=False)
    fresh.load_checkpoint(t.checkpoint_path)
    assert fresh.step == 10


def test_nan_stops_the_cli_with_one_line_and_keeps_the_checkpoint(tmp_path, capsys, monkeypatch):
    from sed_lens.tasks import ModularArithmetic

    real = ModularArithmetic.losses  # the training loss: the Trainer minimises the sum of the task's losses

    def poisoned(self, logits, labels):
        out = real(self, logits, labels)
        if poisoned.calls >= 25:
            out = {k: v * float("nan") for k, v in out.items()}
        poisoned.calls += 1
        return out

    poisoned.calls = 0
    monkeypatch.setattr(ModularArithmetic, "losses", poisoned)
    rd = tmp_path / "nan"
    assert cli([*FLAGS, "--steps", "60", "--run-dir", str(rd)]) == 2
    err = capsys.readouterr().err
    assert "diverged at step 26" in err and err.count("\n") == 1
    state = torch.load(rd / "checkpoints" / "last.pt", weights_only=True)
    params = {k: v for k, v in state["model"].items() if not k.endswith(("IGNORE", "mask"))}
    assert state["step"] == 20 and all(torch.isfinite(v).all() for v in params.values())


FAST = ["--p", "11", "--eval-every", "5", "--checkpoint-every", "10", "--wandb-mode", "disabled", "--no-progress"]


def test_sigterm_checkpoints_prints_the_resume_command_and_the_run_resumes(tmp_path, capsys):
    import re

    rd = tmp_path / "t"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sed_lens.experiments.grokking", *FAST, "--steps", "100000",
                             "--stop-patience", "0", "--run-dir", str(rd)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 300
    try:
        while time.time() < deadline and proc.poll() is None:
            lines = (rd / "metrics.jsonl").read_text().splitlines() if (rd / "metrics.jsonl").exists() else []
            if len(lines) >= 2:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert f"run directory {rd}" in out.splitlines()[0]  # announced at the start
    assert err.count("\n") == 1 and "Traceback" not in err
    m = re.search(r"interrupted by SIGTERM at step (\d+); checkpoint (\S+) — resume with: (.+)$", err.strip())
    assert m, err
    step, ckpt = int(m[1]), Path(m[2])
    assert ckpt == rd / "checkpoints" / "last.pt" and torch.load(ckpt, weights_only=True)["step"] == step
    assert m[3] == f"python -m sed_lens.experiments.grokking --resume {rd}"
    assert cli(["--resume", str(rd), "--steps", str(step + 7)]) == 0
    assert json.loads((rd / "summary.json").read_text())["steps"] == step + 7
    steps = [r["step"] for r in read_jsonl(rd / "metrics.jsonl")]
    assert steps == list(range(0, step + 8, 5))  # every eval once, none lost or repeated across the kill


class CtrlC(Callback):
    """Presses Ctrl-C (SIGINT to this process) after step 7."""

    def on_after_step(self, trainer):
        if trainer.step == 7:
            signal.raise_signal(signal.SIGINT)


@pytest.fixture
def sigint_handler():
    """Sets SIGINT's handler for one test (as a plain ``python`` process has it: ``default_int_handler``, unless the
    test says otherwise) and restores the runner's afterwards (pytest-xdist's workers ignore SIGINT)."""
    before = signal.getsignal(signal.SIGINT)
    yield lambda handler: signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGINT, before)


def test_sigint_in_process_checkpoints_at_the_current_step(tmp_path, tiny_task, sigint_handler):
    from sed_lens.training import TrainingInterrupted

    sigint_handler(signal.default_int_handler)
    with Run(tmp_path / "r", {}, wandb_mode="disabled") as run:
        t = Trainer(build_model("xu2026", tiny_task), tiny_task, TrainConfig(steps=50, eval_every=5), [CtrlC()],
                    run=run, progress=False)
        with pytest.raises(TrainingInterrupted) as e:
            t.fit()
    assert e.value.step == 7 and e.value.exit_code == 130 and e.value.checkpoint == t.checkpoint_path
    assert torch.load(t.checkpoint_path, weights_only=True)["step"] == 7
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is restored


def test_an_ignored_sigint_stays_ignored(tiny_task, sigint_handler):
    # A run started with nohup or in the background ignores SIGINT: Ctrl-C in the terminal must not stop it.
    sigint_handler(signal.SIG_IGN)
    t = Trainer(build_model("xu2026", tiny_task), tiny_task, TrainConfig(steps=10, eval_every=5, checkpoint_every=0),
                [CtrlC()], progress=False)
    assert t.fit().steps == 10
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_resume_checks_everything_before_touching_the_run_and_a_finished_run_says_so(tmp_path, capsys):
    afile = tmp_path / "f"
    afile.write_text("")
    assert cli(["--resume", str(afile)]) == 2
    assert "is a file, not a run directory" in capsys.readouterr().err
    rd = tmp_path / "r"
    assert cli([*FAST, "--steps", "10", "--run-dir", str(rd), "--wandb-mode", "offline"]) == 0
    config = json.loads((rd / "config.json").read_text())
    assert config["init"] == "torch" and config["run_dir"] == str(rd)  # resolved, not null
    assert all("wall_time" in r for r in read_jsonl(rd / "metrics.jsonl"))
    capsys.readouterr()

    def files():  # every run file, and the W&B run folders (W&B's own logs change after it finishes)
        return ({p: p.read_bytes() for p in rd.rglob("*") if p.is_file() and "wandb" not in p.parts},
                sorted((rd / "wandb").glob("offline-run-*")))

    before = files()
    assert cli(["--resume", str(rd)]) == 0  # finished: one line, nothing changes
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "finished run (10 steps); nothing to do" in out and "--steps N" in out
    assert files() == before
    ckpt = rd / "checkpoints" / "last.pt"
    good = ckpt.read_bytes()
    ckpt.write_bytes(good[: len(good) // 2])
    assert cli(["--resume", str(rd), "--steps", "20"]) == 2  # fails: run.json, W&B folders, config untouched
    assert "truncated or corrupted" in capsys.readouterr().err
    assert files() == ({**before[0], ckpt: good[: len(good) // 2]}, before[1])
    ckpt.write_bytes(good)
    assert cli(["--resume", str(rd), "--steps", "8"]) == 2
    assert "does not extend" in capsys.readouterr().err
    assert cli(["--resume", str(rd), "--steps", "20", "--lr", "0.1"]) == 2
    assert "drop --lr" in capsys.readouterr().err
    assert files() == before
    assert cli(["--resume", str(rd), "--steps", "20"]) == 0  # extends the finished run
    assert json.loads((rd / "summary.json").read_text())["steps"] == 20
    assert json.loads((rd / "config.json").read_text())["train"]["steps"] == 20
    assert [r["step"] for r in read_jsonl(rd / "metrics.jsonl")] == [0, 5, 10, 15, 20]
    meta = json.loads((rd / "run.json").read_text())
    assert meta["command"] == json.loads(before[0][rd / "run.json"])["command"] and len(meta["resumes"]) == 1


def test_a_torn_last_metrics_line_neither_stops_resume_nor_the_report(tmp_path, capsys):
    from sed_lens import report

    rd = tmp_path / "r"
    assert cli([*FAST, "--steps", "10", "--run-dir", str(rd)]) == 0
    metrics = rd / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 15, "loss": 0.')  # a kill while writing a row
    with pytest.warns(RuntimeWarning, match="truncated last line"):
        assert run_cli(report.main, [str(rd), "--out", str(tmp_path / "rep")], prog="report") == 0
    with pytest.warns(RuntimeWarning, match="truncated last line"):
        assert cli(["--resume", str(rd), "--steps", "15"]) == 0
    assert [r["step"] for r in read_jsonl(metrics)] == [0, 5, 10, 15]
    capsys.readouterr()
    metrics.write_text(metrics.read_text().replace('"step": 5', '"step": 5, "x', 1))  # damaged, not torn
    assert cli(["--resume", str(rd), "--steps", "20"]) == 2
    err = capsys.readouterr().err
    assert "line 2 is not valid JSON" in err and err.count("\n") == 1
