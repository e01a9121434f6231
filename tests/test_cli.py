import json
import subprocess
import sys

import pytest
from cli_helpers import call_main

from sed_lens.experiments import grokking


def call(argv, capsys):
    """Run the grokking CLI in-process; returns (exit code, stdout, stderr)."""
    return call_main(grokking.main, argv, capsys, "grokking")


def test_help(capsys):
    code, out, _ = call(["--help"], capsys)
    assert code == 0
    for flag in ("--op", "--ops", "--p", "--seed", "--preset", "--init", "--steps", "--batch-size", "--lr",
                 "--weight-decay", "--train-frac", "--run-dir", "--wandb-mode", "--wandb-project"):
        assert flag in out


@pytest.mark.parametrize("argv", [["--bogus"], ["--p", "seven"], ["--preset", "gpt2"], ["--init", "xavier"],
                                  ["--wandb-mode", "sometimes"], ["--steps", "1.5"], ["--p", "1"],
                                  ["--op", "pow"], ["--train-frac", "1.0"], ["--lr", "-1"], ["--ops", ","],
                                  ["--preset", "nanda2023", "--p", "1"]])
def test_bad_flags_give_one_line_and_exit_2(argv, capsys, tmp_path):
    code, out, err = call([*argv, "--run-dir", str(tmp_path / "r"), "--wandb-mode", "disabled"][: len(argv) + (
        0 if "--wandb-mode" in argv else 4)], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "error" in err and "Traceback" not in err


def test_a_short_run_writes_a_run_directory(tmp_path, capsys):
    rd = tmp_path / "run"
    code, out, err = call(["--op", "add", "--p", "11", "--steps", "30", "--run-dir", str(rd), "--wandb-mode",
                           "disabled", "--no-progress", "--eval-every", "10"], capsys)
    assert code == 0, err
    assert "grok step" in out and str(rd) in out
    assert {"config.json", "metrics.jsonl", "summary.json", "checkpoints"} <= {p.name for p in rd.iterdir()}
    summary = json.loads((rd / "summary.json").read_text())
    assert summary["steps"] == 30 and set(summary["grok_step"]) == {"add"}
    config = json.loads((rd / "config.json").read_text())
    assert config["p"] == 11 and config["train"]["steps"] == 30
    model = json.loads((rd / "model.json").read_text())
    assert model["model"]["readout"]["position"] == 0 and model["task"]["n_train"] == 60
    code, _, err = call(["--p", "11", "--run-dir", str(rd), "--wandb-mode", "disabled"], capsys)
    assert code == 2 and "already holds a run" in err


def test_multitask_run_reports_a_grok_step_per_op(tmp_path, capsys):
    code, out, err = call(["--ops", "add,sub,mul,sq", "--p", "7", "--steps", "10", "--eval-every", "5",
                           "--run-dir", str(tmp_path / "m"), "--wandb-mode", "disabled", "--no-progress"], capsys)
    assert code == 0, err
    assert all(f"{op}: grok step" in out for op in ("add", "sub", "mul", "sq"))


def test_subprocess_bad_flag_has_no_traceback(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sed_lens.experiments.grokking", "--p", "x"], capture_output=True,
                       text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_help_and_a_bad_flag_answer_before_torch_is_imported(tmp_path):
    """The deterministic proxy of the < 2 s target (benchmarks/cli_latency.py measures it): parsing needs no
    torch, TransformerLens, W&B or matplotlib."""
    heavy = ("torch", "transformer_lens", "wandb", "matplotlib")
    for module in ("sed_lens.experiments.grokking", "sed_lens.experiments.coupling", "sed_lens.experiments.intervention",
                   "sed_lens.experiments.reproduce", "sed_lens.report"):
        for argv in (["--help"], ["--bogus"]):
            code = ("import runpy, sys\n"
                    f"sys.argv = ['x', *{argv!r}]\n"
                    "try:\n"
                    f"    runpy.run_module({module!r}, run_name='__main__', alter_sys=True)\n"
                    "except SystemExit as e:\n"
                    "    code = e.code\n"
                    f"print(sorted(m for m in {heavy!r} if m in sys.modules), code)\n")
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120)
            assert r.stdout.strip().splitlines()[-1] == f"[] {0 if argv == ['--help'] else 2}", (module, argv, r.stderr)


def test_from_sed_lens_import_still_gives_every_public_name():
    r = subprocess.run([sys.executable, "-c", "import sys, sed_lens; assert 'torch' not in sys.modules; "
                        "from sed_lens import *; import sed_lens as s; [getattr(s, n) for n in s.__all__]; "
                        "from sed_lens import Trainer, TrainConfig, PRESETS; print(Trainer.__module__)"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "sed_lens.training", r.stderr


def test_a_run_announces_its_directory_and_wandb_at_the_start(tmp_path, capsys):
    rd = tmp_path / "a"
    code, out, err = call(["--p", "11", "--steps", "5", "--eval-every", "5", "--sed", "update,gradient,task_gradient",
                           "--sed-every", "1", "--sed-window", "3", "--run-dir", str(rd), "--wandb-mode", "disabled",
                           "--no-progress"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"grokking add-p11-s42: run directory {rd}; W&B disabled"
    # single op: task_gradient is the gradient stream, said in the console and the summary, not dropped silently
    assert any("task_gradient = gradient for a single-op run" in line for line in lines)
    sed = json.loads((rd / "summary.json").read_text())["sed"]
    assert sed["sources"] == ["update", "gradient", "task_gradient"] and "gradient" in sed["streams"]
    assert sed["note"].startswith("task_gradient = gradient")
