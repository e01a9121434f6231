"""The intervention experiment: CLI, aggregation against numpy, and a tiny end-to-end grid."""

import json

import numpy as np
import pytest
import torch
from cli_helpers import call_main

from sed_lens.errors import SedLensError
from sed_lens.experiments import grokking, intervention
from sed_lens.experiments.intervention import CONDITIONS, aggregate, cell_name
from sed_lens.tracking import read_jsonl

# A tiny, quick setup (p 11, a large train split, TransformerLens init): test accuracy crosses 0.15 within 60
# steps for some conditions and not for others (seed 0), so both grokked and censored runs are exercised.
TINY = ["--op", "add", "--p", "11", "--train-frac", "0.8", "--init", "tl", "--lr", "3e-3", "--weight-decay", "0.1",
        "--steps", "60", "--batch-size", "64", "--eval-every", "5", "--grok-acc", "0.15", "--window", "4", "--k", "2",
        "--workers", "1", "--wandb-mode", "disabled", "--no-progress", "--checkpoint-every", "0"]


def call(argv, capsys):
    """Run the intervention CLI in-process; returns (exit code, stdout, stderr)."""
    return call_main(intervention.main, argv, capsys, "intervention")


def test_help(capsys):
    code, out, _ = call(["--help"], capsys)
    assert code == 0
    for flag in ("--op", "--seeds", "--method", "--conditions", "--k", "--window", "--warmup", "--init", "--p",
                 "--steps", "--stop-at-grok", "--out", "--backend", "--workers", "--wandb-mode"):
        assert flag in out
    assert "gradient" in out and "update" in out


@pytest.mark.parametrize("argv", [["--bogus"], ["--k", "0"], ["--k", "two"], ["--conditions", "A,F"],
                                  ["--conditions", "A,A"], ["--method", "weights"], ["--seeds", "1,1"],
                                  ["--seeds", "a,b"], ["--window", "2", "--k", "3"], ["--warmup", "-1"],
                                  ["--op", "pow"], ["--p", "1"], ["--workers", "0"], ["--backend", "slurm"],
                                  ["--init", "xavier"], ["--steps", "-5"]])
def test_bad_flags_give_one_line_and_exit_2(argv, capsys, tmp_path):
    code, _, err = call([*argv, "--out", str(tmp_path / "o"), "--wandb-mode", "disabled"], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "error" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # rejected before any run starts


def test_aggregate_against_numpy():
    grok = {"A": {1: 3000, 2: 3500, 3: 3600}, "C": {1: 1500, 2: 1400, 3: 1700}, "B": {1: 3100, 2: None, 3: 3300}}
    runs = [{"condition": c, "seed": s, "grok_step": g, "steps": 8000} for c, d in grok.items() for s, g in d.items()]
    out = aggregate(runs, ["A", "B", "C"])
    a = np.array([3000, 3500, 3600.0])
    for code, vals in (("A", a), ("C", np.array([1500, 1400, 1700.0])), ("B", np.array([3100, 8000, 3300.0]))):
        s = out[code]
        assert s["grok_steps"] == list(vals) and s["seeds"] == [1, 2, 3] and s["n_runs"] == 3
        assert s["mean"] == pytest.approx(vals.mean()) and s["std"] == pytest.approx(vals.std(ddof=1))
        assert (s["min"], s["max"]) == (vals.min(), vals.max())
        assert s["speedup"] == pytest.approx(a.mean() / vals.mean())
        np.testing.assert_allclose(s["speedup_per_seed"], a / vals)
        assert s["speedup_min"] == pytest.approx((a / vals).min()) and s["speedup_max"] == pytest.approx((a / vals).max())
        assert s["speedup_std"] == pytest.approx((a / vals).std(ddof=1))
        # The speedup of the means is a weighted mean of the per-seed ratios, so it lies inside their range.
        assert s["speedup_min"] - 1e-12 <= s["speedup"] <= s["speedup_max"] + 1e-12
    assert out["B"]["censored"] == 1 and out["A"]["censored"] == 0
    one = aggregate([{"condition": "E", "seed": 1, "grok_step": 100, "steps": 200}], ["E"])
    assert one["E"]["std"] == 0.0 and one["E"]["speedup"] is None and one["E"]["speedup_per_seed"] == []
    with pytest.raises(SedLensError, match="no finished runs"):
        aggregate([], ["A"])


def first_at_least(rows, key, level):
    return next((r["step"] for r in rows if r[key] >= level), None)


def test_tiny_experiment_writes_json_table_and_figures_and_reruns_skip(tmp_path, capsys):
    out = tmp_path / "iv"
    code, stdout, err = call([*TINY, "--seeds", "0", "--out", str(out)], capsys)
    assert code == 0, err
    assert "| A control |" in stdout and "| E keep random |" in stdout and str(out / "intervention.json") in stdout
    result = json.loads((out / "intervention.json").read_text())
    assert [r["condition"] for r in result["runs"]] == list(CONDITIONS)
    for r in result["runs"]:  # each run is a normal run directory; its grok step recomputed from its metrics
        run_dir = out / cell_name(r["condition"], 0)
        assert r["run_dir"] == str(run_dir) and (run_dir / "config.json").is_file()
        rows = read_jsonl(run_dir / "metrics.jsonl")
        assert r["grok_step"] == first_at_least(rows, "test/acc/add", 0.15)
        assert r["curve"]["step"] == [row["step"] for row in rows]
        summary = json.loads((run_dir / "summary.json").read_text())
        mode = CONDITIONS[r["condition"]].mode
        assert summary["intervention"]["mode"] == mode and summary["intervention"]["k"] == 2
        assert summary["intervention"]["projected_steps"] == (0 if mode == "none" else r["steps"] - 4)
        # Stopped at the grok step, or ran to the last step without grokking.
        assert r["steps"] == (r["grok_step"] if r["grok_step"] is not None else 60)
    assert {r["grok_step"] is None for r in result["runs"]} == {True, False}, "the setup should mix both cases"
    stats = result["conditions"]
    assert set(stats) == set(CONDITIONS) and stats["A"]["speedup"] == pytest.approx(1.0)
    runs_a = [r for r in result["runs"] if r["condition"] == "A"]
    grok_a = [r["grok_step"] if r["grok_step"] is not None else r["steps"] for r in runs_a]
    for code_, s in stats.items():
        runs = [r for r in result["runs"] if r["condition"] == code_]
        vals = [r["grok_step"] if r["grok_step"] is not None else r["steps"] for r in runs]
        assert s["mean"] == pytest.approx(np.mean(vals)) and s["censored"] == sum(r["grok_step"] is None for r in runs)
        assert s["speedup"] == pytest.approx(np.mean(grok_a) / np.mean(vals))
    table = (out / "intervention.md").read_text()
    assert "| C keep SED |" in table and "| 1525 | 2.20× |" in table and "| 3358 | 1.00× |" in table
    for name in ("accuracy.png", "speedup.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    # Rerun with the same --out: every run is skipped, the outputs are rewritten identically.
    code, stdout, err = call([*TINY, "--seeds", "0", "--out", str(out)], capsys)
    assert code == 0, err
    assert "(5 already finished)" in stdout
    again = json.loads((out / "intervention.json").read_text())
    assert all(r["skipped"] for r in again["runs"]) and again["conditions"] == result["conditions"]
    # Other settings must not silently reuse those runs.
    code, _, err = call([*TINY, "--seeds", "0", "--out", str(out), "--lr", "0.01"], capsys)
    assert code == 2 and "other settings" in err


def test_control_condition_is_a_plain_grokking_run_and_update_method_runs(tmp_path, capsys):
    out = tmp_path / "iv"
    code, _, err = call([*TINY, "--seeds", "5", "--conditions", "A,B", "--method", "update", "--no-stop-at-grok",
                         "--steps", "12", "--eval-every", "4", "--out", str(out)], capsys)
    assert code == 0, err
    result = json.loads((out / "intervention.json").read_text())
    assert result["config"]["method"] == "update" and list(result["conditions"]) == ["A", "B"]
    cfg = {"ops": ["add"], "p": 11, "seed": 5, "wandb_mode": "disabled", "train_frac": 0.8, "init": "tl",
           "train": {"steps": 12, "batch_size": 64, "eval_every": 4, "checkpoint_every": 0, "grok_acc": 0.15,
                     "lr": 3e-3, "weight_decay": 0.1}}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as every grid cell runs: CPU kernels round differently with other thread counts
    try:
        grokking.grid_cell(cfg, str(tmp_path / "plain"))
    finally:
        torch.set_num_threads(threads)
    plain = read_jsonl(tmp_path / "plain" / "metrics.jsonl")
    control = read_jsonl(out / cell_name("A", 5) / "metrics.jsonl")
    # The control records its window but changes nothing: the same training, step for step.
    assert [r["test/acc/add"] for r in control] == [r["test/acc/add"] for r in plain]
    assert [r["train/loss"] for r in control] == [r["train/loss"] for r in plain]
    removed = read_jsonl(out / cell_name("B", 5) / "metrics.jsonl")
    assert removed[-1]["intervention/projected_steps"] == 12 - 4
    assert [r["train/loss"] for r in removed[:2]] == [r["train/loss"] for r in plain[:2]]  # warm-up: identical
    assert removed[-1]["train/loss"] != plain[-1]["train/loss"]
    table = (out / "intervention.md").read_text()
    assert "| B remove SED |" in table and "1.21×" in table


def tiny_cell(code, mode, steps, eval_every, checkpoint_every, window, **grok_extra):
    """A tiny intervention grid cell (p 11, seed 5) of condition ``code`` projecting with ``mode``."""
    from sed_lens.grid import Cell

    grok = {"ops": ["add"], "p": 11, "seed": 5, "wandb_mode": "disabled", "train_frac": 0.8, "init": "tl", **grok_extra,
            "train": {"steps": steps, "batch_size": 64, "eval_every": eval_every, "checkpoint_every": checkpoint_every,
                      "grok_acc": 0.99, "lr": 3e-3, "weight_decay": 0.1}}
    config = {"condition": code, "grokking": grok,
              "projection": {"k": 2, "mode": mode, "basis": "sed", "apply_to": "gradient", "window": window,
                             "warmup": 4, "seed": 5}}
    return Cell(f"{code}-{mode}-sed-s5", "sed_lens.experiments.intervention:grid_cell", config)


def numbers(summary):
    """A cell's result without its timings."""
    return {k: v for k, v in summary.items() if k not in ("wall_time_s", "timings")}


def test_an_interrupted_intervention_cell_resumes_from_its_checkpoint_with_the_same_result(tmp_path, monkeypatch):
    from sed_lens.grid import Cell, execute_cell
    from sed_lens.hooks.interventions import SubspaceProjection

    c = tiny_cell("B", "remove", steps=40, eval_every=5, checkpoint_every=10, window=4)
    config, grok = c.config, c.config["grokking"]
    whole = execute_cell(c, str(tmp_path / "whole"))
    real = SubspaceProjection.on_after_step

    def killed_at_step_27(self, trainer):
        if trainer.step == 27:
            raise KeyboardInterrupt
        real(self, trainer)

    monkeypatch.setattr(SubspaceProjection, "on_after_step", killed_at_step_27)
    with pytest.raises(KeyboardInterrupt):
        execute_cell(c, str(tmp_path / "cut"))
    monkeypatch.setattr(SubspaceProjection, "on_after_step", real)
    resumed = execute_cell(c, str(tmp_path / "cut"))
    meta = json.loads((tmp_path / "cut" / "run.json").read_text())
    assert len(meta["resumes"]) == 1  # continued from its step-20 checkpoint, not started over
    assert numbers(resumed) == numbers(whole)
    # another config in the same directory is never continued: it starts over
    other = Cell(c.name, c.target, {**config, "grokking": {**grok, "seed": 6}})
    execute_cell(other, str(tmp_path / "cut"))
    assert not json.loads((tmp_path / "cut" / "run.json").read_text()).get("resumes")
    # a directory whose settings cannot be read (a torn config.json) starts over too, without an error
    (tmp_path / "cut" / "cell.json").unlink(missing_ok=True)
    (tmp_path / "cut" / "config.json").write_text('{"experiment": "grok')
    assert numbers(execute_cell(c, str(tmp_path / "cut"))) == numbers(whole)


def test_a_finished_intervention_cell_keeps_its_checkpoint_without_the_window(tmp_path, monkeypatch):
    from sed_lens import serialization
    from sed_lens.grid import execute_cell
    from sed_lens.hooks.interventions import SubspaceProjection

    c = tiny_cell("C", "keep", steps=24, eval_every=4, checkpoint_every=8, window=6, sed=[])
    def tensors(obj):
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, dict | list | tuple):
            for v in obj.values() if isinstance(obj, dict) else obj:
                yield from tensors(v)

    with monkeypatch.context() as m:  # a finished cell's checkpoint as it was: the projection's whole state
        m.setattr(SubspaceProjection, "final_state_dict", SubspaceProjection.state_dict)
        full = execute_cell(c, str(tmp_path / "full"))
    slim = execute_cell(c, str(tmp_path / "slim"))
    assert numbers(slim) == numbers(full)
    full_ckpt, slim_ckpt = (tmp_path / d / "checkpoints" / "last.pt" for d in ("full", "slim"))
    before, after = serialization.load(full_ckpt), serialization.load(slim_ckpt)
    assert before["callbacks"][0]["window"]["x"].shape[0] == 6 and after["callbacks"][0]["window"] is None
    assert after["final"] is True  # a finished run's checkpoint says so
    # Only the callback state differs: the model (what analyses read) and step are those of the full checkpoint.
    assert after["step"] == before["step"] == slim["steps"] and after["config"] == before["config"]
    assert all(torch.equal(v, before["model"][k]) for k, v in after["model"].items())
    assert [t.dtype for t in tensors(after["callbacks"])] == [torch.uint8]  # the random generator's state only
    window_bytes = sum(t.numel() * t.element_size() for t in tensors(before["callbacks"][0]["window"]))
    assert full_ckpt.stat().st_size - slim_ckpt.stat().st_size >= window_bytes
    # Killed after its last checkpoint but before the grid marked it done: met again, it finishes the same way
    # (no step to train, so the missing window is not needed).
    (tmp_path / "slim" / "cell.json").unlink()
    assert numbers(execute_cell(c, str(tmp_path / "slim"))) == numbers(full)
    assert len(json.loads((tmp_path / "slim" / "run.json").read_text())["resumes"]) == 1
    assert serialization.load(slim_ckpt)["callbacks"][0]["window"] is None
