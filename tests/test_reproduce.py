"""The one-command reproduction: its plan, and the --quick run's qualitative claims (slow; CI runs it)."""

import json

import pytest

from sed_lens.cli import run_cli
from sed_lens.experiments import reproduce
from sed_lens.experiments.reproduce import ReproduceConfig, all_cells, plan


def test_full_plan_is_the_papers_protocol(tmp_path):
    coupling, interventions = plan(ReproduceConfig(out=str(tmp_path)))
    assert coupling.ops == ("add", "sub", "mul", "sq") and coupling.seeds == (42, 137, 2024) and coupling.p == 97
    assert coupling.scan.n_snapshots == 40 and coupling.scan.window == 20 and coupling.scan.k == 3
    assert coupling.scan.n_probes == 1024 and coupling.scan.n_random == 20 and coupling.multitask_snapshots == 30
    assert coupling.window_ablation and coupling.eps_ablation and coupling.multitask
    assert {(iv.op, iv.method) for iv in interventions} == {(op, m) for op in ("add", "mul") for m in ("gradient", "update")}
    assert all(iv.conditions == ("A", "B", "C", "D", "E") and iv.seeds == (42, 137, 2024) for iv in interventions)
    cells = all_cells(coupling, interventions)
    names = [c.name for _, c in cells]
    # 12 single-task + 1 multitask coupling runs; per op 5 conditions x 3 seeds by gradient projection and the
    # 4 non-control conditions by update projection (the control is shared between the two methods).
    assert len(cells) == 13 + 2 * (15 + 12)
    assert names[0] == "multitask-s42" and len(set((str(p), n) for p, n in ((p, c.name) for p, c in cells))) == len(cells)
    # Seed by seed: every run of seed 42 before any of 137, and those before 2024.
    seeds = [c.config["grokking"]["seed"] for _, c in cells]
    assert seeds == sorted(seeds, key=(42, 137, 2024).index) and seeds.count(42) == 5 + 2 * (5 + 4)


def test_seeds_option_restricts_every_experiment_and_keeps_the_runs(tmp_path):
    full = {(str(p), c.name): c.config for p, c in all_cells(*plan(ReproduceConfig(out=str(tmp_path))))}
    coupling, interventions = plan(ReproduceConfig(out=str(tmp_path), seeds=(42,)))
    assert coupling.seeds == (42,) and all(iv.seeds == (42,) for iv in interventions)
    one = all_cells(coupling, interventions)
    # The one-seed report reads exactly the seed-42 runs of the full reproduction (same names, same configs).
    assert len(one) == 5 + 2 * (5 + 4)
    assert all(full[(str(p), c.name)] == c.config for p, c in one)


def test_report_says_when_seeds_differ_from_the_papers():
    from sed_lens.experiments.reproduction_report import discussion

    def notes(meta):
        return "\n".join(discussion({"aggregate": {"single": {}, "multitask": {}}, "config": {"init": "torch"}}, [], meta))

    assert "Seeds 42 only" in notes({"seeds": [42], "quick": False})
    assert "Seeds" not in notes({"seeds": [42, 137, 2024], "quick": False})


def test_help_and_bad_flags(capsys):
    with pytest.raises(SystemExit) as e:
        run_cli(reproduce.main, ["--help"])
    assert e.value.code == 0 and "--quick" in capsys.readouterr().out


@pytest.mark.slow
def test_quick_reproduction_checks_the_papers_qualitative_claims(tmp_path, capsys):
    out = tmp_path / "repro"
    assert run_cli(reproduce.main, ["--quick", "--out", str(out), "--wandb-mode", "disabled", "--no-progress"]) == 0
    summary = json.loads((out / "reproduction.json").read_text())
    claims = summary["claims"]
    assert claims["gradient_over_update_min"] > 5  # gradient SED couples far more strongly than update SED
    assert claims["per_op_over_aggregated_min"] > 2  # per-op gradient SED above the aggregated update SED
    assert claims["keep_speedup_min"] > 1  # keeping a rank-3 subspace speeds grokking
    text = (out / "REPRODUCTION.md").read_text()
    for row in ("single-task gradient-SED peak R̄", "window ablation", "ε ablation", "multitask: per-op gradient SED",
                "intervention, gradient projection, add"):
        assert row in text
    page = (out / "REPRODUCTION.html").read_text()  # the same report, one self-contained page
    assert "single-task gradient-SED peak R̄" in page and page.count("data:image/png;base64,") == text.count("\n![")
    assert "![" in text and all((out / line.split("](")[1].rstrip(")\n")).is_file()
                                for line in text.splitlines() if line.startswith("!["))


def test_run_times_reads_each_runs_start_and_finish(tmp_path):
    import os
    import time

    from sed_lens.experiments.reproduce import run_times

    t0 = time.mktime(time.strptime("2026-01-01 10:00:00", "%Y-%m-%d %H:%M:%S"))
    for name, start, minutes in (("a", 0, 10), ("b", 5 * 60, 20), ("unfinished", 0, None)):
        d = tmp_path / name
        d.mkdir()
        (d / "run.json").write_text(json.dumps({"created": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t0 + start))}))
        if minutes is not None:
            (d / "cell.json").write_text("{}")
            os.utime(d / "cell.json", (t0 + start + minutes * 60, t0 + start + minutes * 60))
    times = run_times(tmp_path, ["a", "b", "unfinished", "missing"])
    assert times["worker_s"] == pytest.approx(30 * 60) and times["span_s"] == pytest.approx(25 * 60)
    assert run_times(tmp_path, ["unfinished"]) == {"worker_s": None, "span_s": None}


def _multitask(update, gradient, per_op):
    return {"aggregate": {"multitask": {"add": [{"update_peak": update, "gradient_peak": gradient, "per_op_peak": per_op,
                                                 "seed": 42}]}}}


def test_multitask_note_reads_the_aggregated_gradient_control():
    from sed_lens.experiments.reproduction_report import multitask_notes

    # The aggregated gradient couples like the per-op gradients: aggregation is not what hides the coupling.
    assert "does not support" in multitask_notes(_multitask(4.0, 38.0, 35.0))[0]
    # The aggregated gradient is already low: aggregation hides part of it, as the paper says.
    assert "as the paper says." in multitask_notes(_multitask(0.8, 5.0, 30.0))[0]
    assert multitask_notes({"aggregate": {"multitask": {}}}) == []


def test_intervention_note_only_when_the_size_differs_from_the_papers():
    from sed_lens.experiments.reproduction_report import intervention_notes

    def grid(keep, method="gradient", remove=1.0):
        cond = {"A": {"speedup": 1.0}, "B": {"speedup": remove}, "C": {"speedup": keep}, "E": {"speedup": keep}}
        return {"config": {"op": "add", "method": method}, "conditions": cond}

    assert "larger" in intervention_notes([grid(3.4)])[0]
    assert "smaller" in intervention_notes([grid(1.3)])[0]
    assert intervention_notes([grid(2.3)]) == []
    notes = intervention_notes([grid(2.3), grid(2.3, "update", remove=1.3)])
    assert len(notes) == 1 and "add 1.30×" in notes[0] and "add 1.00×" in notes[0]
