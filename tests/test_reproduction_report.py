"""The reproduction report built from compact results: typed loading, the numbers it states, and that the
committed results regenerate the committed report."""

import json
from pathlib import Path

import pytest

from sed_lens.analysis.scan_key import ScanKey
from sed_lens.errors import SedLensError
from sed_lens.experiments.reproduction_report import (
    claim_numbers,
    differences,
    headline,
    lacking,
    multitask_table,
    write_report,
)
from sed_lens.experiments.reproduction_results import Spread, load_results, speedups

ROOT = Path(__file__).resolve().parents[1]
GRADIENT = ScanKey("gradient", "leading")


def scan(peaks, phases=(100, 1000), steps=(0, 500, 1000, 1500), fd=None):
    """A compact scan whose keys peak at ``peaks`` ({key: peak R̄}); the series rises to the peak at the end."""
    series, summary = {}, {}
    for key, top in peaks.items():
        ys = [top / 2 ** (len(steps) - 1 - i) for i in range(len(steps))]
        series[key] = {"step": list(steps), "R": [[y, y, y] for y in ys], "R_mean": ys}
        summary[key] = {"peak_R_mean": top, "peak_R1": top, "peak_step": steps[-1], "final_R_mean": top,
                        "phase_median_R_mean": {"pre": ys[0], "transition": ys[1], "post": ys[-1]}}
    for key, top in (fd or {}).items():
        summary[key] = {"peak_R_mean": top, "peak_R1": top, "peak_step": steps[-1], "final_R_mean": top}
    return {"measured": list(steps), "n_snapshots_total": 61, "last_step": steps[-1], "phases": {"add": list(phases)},
            "random_median": {"add": [1.0] * len(steps)}, "series": {"add": series}, "summary": {"add": summary}}


def coupling_cell(op, seed, grad, upd, grad_post, analysis=(1.0, 1.1, 0.9)):
    scans = {"stop_rule": {}, "post_grok": {}}
    for a, f in enumerate(analysis):
        scans["stop_rule"][str(a)] = scan({"gradient/leading": grad * f, "update/leading": upd * f},
                                          fd={"gradient/leading/fd_eps=0.005": grad * 0.95} if a == 0 else None)
        scans["post_grok"][str(a)] = scan({"gradient/leading": grad_post * f, "update/leading": upd * f},
                                          steps=(0, 500, 1000, 1500, 2000),
                                          fd={"gradient/leading/fd_eps=0.005": grad_post * 0.6} if a == 0 else None)
    for by in scans.values():
        for s in by.values():
            s["series"] = {op: s["series"]["add"]}
            s["summary"] = {op: s["summary"]["add"]}
            s["phases"] = {op: s["phases"]["add"]}
    train = {"steps": 8000, "stop_acc": 0.98, "stop_patience": 20, "post_grok_steps": 1000}
    config = {"grokking": {"ops": [op], "seed": seed, "train": train}, "every": 25,
              "scan": {"n_snapshots": 40, "window": 20, "k": 3, "n_probes": 1024, "n_random": 20,
                       "ablation_windows": [], "ablation_eps": []}}
    summary = {"train": {"steps": 2000, "grok_step": {op: 900}, "stop_step": 1500, "cross_step": 1000},
               "scans": scans, "history": {}, "timings": {"train": 300.0, "scan": 200.0, "outputs": 1.0}}
    return {"name": f"{op}-s{seed}", "target": "x:y", "config": config, "summary": summary}


def multitask_cell(seed, standard, per_op=None, ops=("add", "mul")):
    """A compact multitask run: ``standard`` / ``per_op`` give per op (update, aggregated gradient, per-op gradient)
    peak R̄ of the standard reading and of the author's per-op inputs (keys ``…/per_op``; left out when None)."""
    scans = {"stop_rule": {}, "post_grok": {}}
    for a, f in enumerate((1.0, 1.1, 0.9)):
        for length, steps in (("stop_rule", (0, 500, 1000, 1500)), ("post_grok", (0, 500, 1000, 1500, 2000))):
            series, summary = {}, {}
            for op in ops:
                peaks = {}
                for suffix, values in (("", standard), ("/per_op", per_op)):
                    if values is None:
                        continue
                    u, g, t = values[op]
                    peaks |= {f"update/leading{suffix}": u * f, f"gradient/leading{suffix}": g * f,
                              f"task_gradient/{op}/leading{suffix}": t * f}
                one = scan(peaks, steps=steps)
                series[op], summary[op] = one["series"]["add"], one["summary"]["add"]
            scans[length][str(a)] = {**scan({}, steps=steps), "series": series, "summary": summary,
                                     "phases": {op: [100, 1000] for op in ops}}
    train = {"steps": 8000, "stop_acc": 0.98, "stop_patience": 20, "post_grok_steps": 1000}
    config = {"grokking": {"ops": list(ops), "seed": seed, "train": train}, "every": 25,
              "scan": {"n_snapshots": 30, "window": 20, "k": 3, "n_probes": 1024, "n_random": 20,
                       "ablation_windows": [], "ablation_eps": [], "per_op_inputs": per_op is not None}}
    summary = {"train": {"steps": 3000, "grok_step": {op: 900 for op in ops}, "stop_step": 1500, "cross_step": 1000},
               "scans": scans, "history": {}, "timings": {"train": 300.0, "scan": 200.0, "outputs": 1.0}}
    return {"name": f"multitask-s{seed}", "target": "x:y", "config": config, "summary": summary}


def intervention_cell(op, seed, condition, method, grok_step):
    config = {"condition": condition, "grokking": {"ops": [op], "seed": seed},
              "projection": {"apply_to": method, "mode": "keep"}}
    return {"config": config, "summary": {"grok_step": {op: grok_step}, "steps": grok_step or 2000, "wall_time_s": 60.0}}


@pytest.fixture
def results_dir(tmp_path):
    d = tmp_path / "runs"
    cells = {"coupling/cells/add-s42": coupling_cell("add", 42, 120.0, 8.0, 260.0),
             "coupling/cells/mul-s42": coupling_cell("mul", 42, 90.0, 6.0, 200.0),
             "coupling/cells/add-s137": coupling_cell("add", 137, 150.0, 9.0, 300.0),
             "intervention/add-gradient/A-s42": intervention_cell("add", 42, "A", "gradient", 3000),
             "intervention/add-gradient/C-s42": intervention_cell("add", 42, "C", "gradient", 1000),
             "intervention/add-gradient/E-s42": intervention_cell("add", 42, "E", "gradient", None)}
    for name, data in cells.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / f"{name}.json").write_text(json.dumps(data))
    return d


def test_results_are_typed_from_their_configs_not_their_names(results_dir):
    res = load_results(results_dir)
    assert res.ops == ["add", "mul"] and res.seeds == [42, 137]
    add42 = next(r for r in res.single("add") if r.seed == 42)
    assert add42.over_seeds("stop_rule", "add", GRADIENT).values == pytest.approx((120.0, 132.0, 108.0))
    assert add42.over_seeds("stop_rule", "add", GRADIENT).median == pytest.approx(120.0)
    assert add42.phase_medians("post_grok", "add", GRADIENT)["post"] == pytest.approx(260.0)
    assert res.intervention_grids() == [("add", "gradient")]
    assert res.worker_s == pytest.approx(3 * 501.0 + 3 * 60.0)


def test_spread_and_speedups_against_hand_computed_values(results_dir):
    sp = Spread.of([3.0, None, 1.0, 2.0])
    assert (sp.n, sp.median, sp.lo, sp.hi, sp.mean, sp.sd) == (3, 2.0, 1.0, 3.0, 2.0, 1.0)
    res = load_results(results_dir)
    s = speedups(res.grid("add", "gradient"))
    assert s["C"]["speedup"] == pytest.approx(3.0) and s["C"]["per_seed"] == {42: pytest.approx(3.0)}
    # A run that never grokked counts at its last step (2000) and is marked censored.
    assert s["E"]["censored"] == 1 and s["E"]["speedup"] == pytest.approx(1.5)
    # A grid part-way through a seed: the control of seed 137 is in, its conditions are not. The speedup compares
    # seed 42 with seed 42 only (mean control over both seeds would be (3000 + 2000) / 2 / 1000 = 2.5).
    import dataclasses

    extra = dataclasses.replace(next(r for r in res.grid("add", "gradient") if r.condition == "A"), seed=137,
                                grok_step=2000, steps=2000)
    s = speedups([*res.grid("add", "gradient"), extra])
    assert s["C"]["speedup"] == pytest.approx(3.0) and s["A"]["mean"] == pytest.approx(2500.0)
    assert s["A"]["speedup"] == pytest.approx(1.0) and s["A"]["per_seed"] == {42: 1.0, 137: 1.0}


def test_the_report_states_the_run_length_effect_the_noise_and_the_derivative_with_numbers(results_dir):
    res = load_results(results_dir)
    text = "\n".join(b.text for b in differences(res) if hasattr(b, "text"))
    # Post-grok / stop-rule gradient peaks: 260/120, 200/90, 300/150.
    assert "multiplies the gradient-SED peak R̄ by 2.00–2.22 (median 2.17; higher in 3 of 3 runs)" in text and "add s42 120 → 260" in text
    assert "Runs inside the paper's 100–330: 2 of 3 stop-rule, 3 of 3 post-grok" in text
    assert "range of 20% of its median" in text  # analysis seeds at ×1.1 and ×0.9
    assert "0.95× the exact one in the stop-rule runs" in text and "0.60× the exact one in the post-grok runs" in text
    rows = headline(res)[0].rows
    assert any(r[0].startswith("single-task gradient-SED peak R̄, exact") and r[2].startswith("90–150") and
               r[3].startswith("200–300") for r in rows)
    claims = claim_numbers(res)
    assert claims["gradient_over_update_min/stop_rule"] == pytest.approx(15.0)
    assert claims["keep_speedup_min"] == pytest.approx(1.5)


def test_a_seed_without_every_run_the_others_have_is_named_partial(results_dir):
    res = load_results(results_dir)
    lacks = ["coupling mul", "intervention add-gradient A", "intervention add-gradient C", "intervention add-gradient E"]
    assert res.missing() == {137: lacks}
    text = "\n".join(b.text for b in differences(res) if hasattr(b, "text"))
    assert f"Seeds 42 complete so far; seed 137 lacks 4 runs ({', '.join(lacks)})" in text
    assert lacking(lacks + ["coupling sq", "coupling sub", "intervention add-update B"]) == \
        "7 runs (3 coupling, 4 intervention)"


def test_report_files_and_figures(results_dir, tmp_path):
    md, html = write_report(results_dir, tmp_path / "out" / "REPRODUCTION.md", {"source": "RUNS", "report": "R.md"})
    text = md.read_text()
    assert "--report-only --results RUNS --report R.md" in text and "Training seeds: 42, 137 (partial)." in text
    figs = [line.split("](")[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]
    assert len(figs) == 2 and all((md.parent / f).is_file() for f in figs)
    assert html.read_text().count("data:image/png;base64,") == 2


def test_missing_or_old_results_are_one_clear_error(tmp_path):
    with pytest.raises(SedLensError, match="does not exist"):
        load_results(tmp_path / "nothing")
    (tmp_path / "old.json").write_text(json.dumps({"config": {"scan": {}, "grokking": {"ops": ["add"], "seed": 1}},
                                                   "summary": {"train": {}, "coupling": {}}}))
    with pytest.raises(SedLensError, match="rerun the reproduction"):
        load_results(tmp_path)


def test_the_committed_results_regenerate_the_committed_report(tmp_path, monkeypatch):
    runs, committed = ROOT / "docs" / "reproduction" / "runs", ROOT / "docs" / "REPRODUCTION.md"
    assert any(runs.rglob("*.json")), "docs/reproduction/runs holds the reproduction's compact results"
    monkeypatch.chdir(ROOT)
    md, _ = write_report("docs/reproduction/runs", tmp_path / "REPRODUCTION.md",
                         {"source": "docs/reproduction/runs", "report": "docs/REPRODUCTION.md"},
                         replicates="docs/reproduction/replicates")
    assert md.read_text() == committed.read_text()


def test_a_run_whose_stop_rule_fired_after_the_post_grok_stretch_is_its_own_post_grok_run(tmp_path):
    cell = coupling_cell("sq", 42, 150.0, 7.0, 999.0)
    del cell["summary"]["scans"]["post_grok"]
    cell["summary"]["train"].update({"cross_step": 2125, "stop_step": 3525, "steps": 3525})
    (tmp_path / "sq.json").write_text(json.dumps(cell))
    run = load_results(tmp_path).single("sq")[0]
    assert run.lengths == ["stop_rule", "post_grok"]
    assert run.over_seeds("post_grok", "sq", GRADIENT).median == pytest.approx(150.0)
    cell["summary"]["train"]["stop_step"] = 2500  # stopped within the stretch and never trained past it
    (tmp_path / "sq.json").write_text(json.dumps(cell))
    assert load_results(tmp_path).single("sq")[0].lengths == ["stop_rule"]


def write_cell(directory, name, cell):
    (directory / name).parent.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.json").write_text(json.dumps(cell))


def texts(blocks):
    return "\n".join(b.text for b in blocks if hasattr(b, "text"))


def test_without_a_multitask_run_the_report_says_it_is_missing(results_dir):
    res = load_results(results_dir)
    assert res.multitask == [] and multitask_table(res) == []
    assert "Multitask: missing.** No multitask run in these results yet" in texts(differences(res))


def test_a_multitask_run_is_reported_under_both_readings_with_the_papers_numbers(results_dir):
    # standard reading: update SED peaks above 1; the author's per-op inputs: below 1 for every op
    write_cell(results_dir, "coupling/cells/multitask-s42", multitask_cell(
        42, standard={"add": (3.0, 40.0, 60.0), "mul": (2.5, 30.0, 50.0)},
        per_op={"add": (0.8, 20.0, 35.0), "mul": (0.6, 15.0, 25.0)}))
    res = load_results(results_dir)
    (mt,) = res.multitask
    rows = {r[0]: r for r in headline(res)[0].rows}
    assert rows["multitask (seed 42): aggregated update SED, peak R̄"][2] == "add 3.00 [2.70–3.30]; mul 2.50 [2.25–2.75]"
    own = rows["multitask (seed 42), the author's per-op inputs: aggregated update SED, peak R̄"]
    assert own[1] == "≤ 1 for every task" and own[2] == "add 0.80 [0.72–0.88]; mul 0.60 [0.54–0.66]"
    per = rows["multitask (seed 42), the author's per-op inputs: per-op gradient SED, peak R̄"]
    assert per[1] == "add 31.5; sub 44.9; mul 23.8; sq 21.8" and per[2] == "add 35 [32–38]; mul 25 [22–28]"
    table = multitask_table(res)[1]
    by = {(r[0], r[1], r[2]): r for r in table.rows}
    assert len(table.rows) == 2 * 2 * 2  # ops × readings × run lengths
    r = by[("mul", "author's per-op inputs", "stop-rule run")]
    # update peak [analysis seeds], update phase medians (the series halves from the peak back), gradients, paper
    assert r[3] == "0.60 [0.54–0.66]" and r[4] == "0.07 / 0.15 / 0.60" and r[5] == "15.0 [13.5–16.5]"
    assert r[6] == "25.0 [22.5–27.5]" and r[7] == "≤ 1; 23.8"
    assert by[("add", "standard inputs", "post-grok run")][3] == "3.00 [2.70–3.30]"
    text = texts(differences(res))
    assert "aggregated update SED ≤ 1?** The paper reports R̄ ≤ 1 for every task" in text
    assert "standard inputs: peak R̄ 2.50–3.00 (add 3.00; mul 2.50), ≤ 1 for 0 of 2 ops" in text
    assert "author's per-op inputs: peak R̄ 0.60–0.80 (add 0.80; mul 0.60), ≤ 1 for 2 of 2 ops" in text
    assert "appears under the author's per-op inputs only." in text and "Multitask: missing" not in text
    claims = claim_numbers(res)
    assert claims["multitask_update_peak_max"] == pytest.approx(3.0)
    assert claims["multitask_update_peak_max/per_op_inputs"] == pytest.approx(0.8)


def test_a_multitask_run_without_the_per_op_inputs_says_so(tmp_path):
    write_cell(tmp_path, "coupling/cells/multitask-s42", multitask_cell(
        42, standard={"add": (0.9, 40.0, 60.0), "mul": (0.7, 30.0, 50.0)}))
    res = load_results(tmp_path)
    assert not any("per-op inputs" in r[0] for r in headline(res)[0].rows)
    assert {r[1] for r in multitask_table(res)[1].rows} == {"standard inputs"}
    text = texts(differences(res))
    assert "the author's per-op inputs were not measured in this run" in text
    assert "≤ 1 for 2 of 2 ops" in text and "appears under the standard inputs only." in text
    assert claim_numbers(res)["multitask_update_peak_max/per_op_inputs"] is None


def test_a_multitask_run_that_never_finished_grokking_says_so(tmp_path):
    cell = multitask_cell(42, standard={"add": (3.0, 40.0, 60.0), "mul": (2.5, 30.0, 50.0)})
    s = cell["summary"]
    del s["scans"]["post_grok"]
    s["train"] |= {"steps": 8000, "stop_step": None, "cross_step": None, "grok_step": {"add": 7350, "mul": None}}
    s["history"] = {"step": [0, 4000, 8000], "test/acc/add": [0.0, 0.5, 0.63], "test/acc/mul": [0.0, 0.1, 0.24]}
    write_cell(tmp_path, "coupling/cells/multitask-s42", cell)
    res = load_results(tmp_path)
    rows = {r[0]: r for r in headline(res)[0].rows}
    assert rows["multitask (seed 42): aggregated update SED, peak R̄"][3] == \
        "none: the stop rule never fired in its 8000 steps"
    text = texts(differences(res))
    assert ("It trained all its 8000 steps (the paper's cap) and test accuracy ≥ 0.98 was reached by no op (final "
            "test accuracy: add 0.63; mul 0.24; grok step, test ≥ 0.5: add 7350; mul never)") in text
    finished = multitask_cell(42, standard={"add": (3.0, 40.0, 60.0), "mul": (2.5, 30.0, 50.0)})
    finished["summary"]["history"] = {"step": [0, 1000], "test/acc/add": [0.0, 0.99], "test/acc/mul": [0.0, 0.98]}
    write_cell(tmp_path, "coupling/cells/multitask-s42", finished)
    assert "It trained all its" not in texts(differences(load_results(tmp_path)))


def test_the_runs_table_lists_runs_by_op_then_numeric_seed(results_dir):
    from sed_lens.experiments.reproduction_report import run_table

    write_cell(results_dir, "coupling/cells/add-s2024", coupling_cell("add", 2024, 130.0, 8.0, 250.0))
    rows = run_table(load_results(results_dir))[0].rows
    assert [(r[0], r[1]) for r in rows] == [("add", "42"), ("add", "137"), ("add", "2024"), ("mul", "42")]


def test_a_replicate_is_set_beside_the_main_results_number_by_number(results_dir, tmp_path):
    from sed_lens.experiments.reproduction_replicates import load_replicates, replicates_blocks

    rep = tmp_path / "replicates" / "other-cpu"
    moved = coupling_cell("add", 42, 132.0, 8.0, 260.0)  # gradient SED peak 120 → 132 (+10 %), update unchanged
    moved["provenance"] = {"cpu": "Chip Y", "cpu_capability": "AVX2"}
    write_cell(rep, "coupling/cells/add-s42", moved)
    for name, cell in {"A-s42": intervention_cell("add", 42, "A", "gradient", 3000),
                       "C-s42": intervention_cell("add", 42, "C", "gradient", 1100),
                       "C-s999": intervention_cell("add", 999, "C", "gradient", 700)}.items():  # s999: unmatched
        write_cell(rep, f"intervention/add-gradient/{name}", {**cell, "provenance": moved["provenance"]})
    curves = intervention_cell("add", 42, "A", "gradient", 3000)  # the same grok step, other curves: not identical
    curves["summary"]["history"] = {"step": [0, 25], "test/acc/add": [0.0, 0.1]}
    write_cell(rep, "intervention/add-gradient/A2-s42", {**curves, "provenance": moved["provenance"]})
    blocks = replicates_blocks(load_results(results_dir), load_replicates(tmp_path / "replicates"))
    text = texts(blocks)
    assert "Replicate `other-cpu`" in text and "4 runs of training seed 42 rerun with the same configs on Chip Y (AVX2)" in text
    assert "the main results' runs of that seed: not recorded" in text and "1 of 4 runs are bit-identical" in text
    # by hand: 132 / 120 − 1 = 10 %; training seeds of add: sd(120, 150) / 135 = 15.7 %; the analysis seeds of
    # add-s42 (120, 132, 108): sd 12 / mean 120 = 10 %; the grok steps are equal
    assert "Peak R̄, gradient SED: changed by a median 10 % (largest 10 %); over the main results' training seeds it " \
           "varies by a median coefficient of variation of 16 % per op, over one run's analysis seeds by 10 %." in text
    assert "Peak R̄, update SED: changed by a median 0.0 %" in text and "Grok step: changed by a median 0.0 %" in text
    assert "Intervention grok steps: changed by a median 0.0 % (largest 10 %)" in text  # A: 0 %, 0 %; C: +10 %
    coupling_rows, iv_rows = (b.rows for b in blocks if hasattr(b, "rows"))
    assert coupling_rows == [["add s42", "900 (same)", "1500 (same)", "120.0 → 132.0", "8.0 (same)", "15.0 → 16.5"]]
    assert iv_rows == [["add", "A", "42", "3000 (same)", "— (same)"], ["add", "A", "42", "3000 (same)", "— (same)"],
                       ["add-gradient", "C", "42", "1000 → 1100", "3.00 → 2.73"]]
    # the report names the replicates in its regeneration command and carries the section
    md, _ = write_report(results_dir, tmp_path / "out" / "REPRODUCTION.md", {"source": "RUNS", "report": "R.md"},
                         replicates=tmp_path / "replicates")
    assert f"--replicates {tmp_path / 'replicates'}`" in md.read_text()
    assert "## Same code, same seed, another CPU" in md.read_text()


def test_replicates_must_be_folders_of_kept_results(tmp_path):
    from sed_lens.experiments.reproduction_replicates import load_replicates

    with pytest.raises(SedLensError, match="does not exist"):
        load_replicates(tmp_path / "nowhere")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(SedLensError, match="holds no replicate"):
        load_replicates(tmp_path / "empty")
