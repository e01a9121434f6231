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
    # longest first within a seed: the multitask run, then the coupling run carrying the ablations
    assert names[:3] == ["multitask-s42", "add-s42", "sub-s42"]
    assert cells[1][1].config["scan"]["ablation_windows"] and not cells[2][1].config["scan"]["ablation_windows"]
    assert len({(str(p), c.name) for p, c in cells}) == len(cells)
    # Seed by seed: every run of seed 42 before any of 137, and those before 2024.
    seeds = [c.config["grokking"]["seed"] for _, c in cells]
    assert seeds == sorted(seeds, key=(42, 137, 2024).index) and seeds.count(42) == 5 + 2 * (5 + 4)
    # the author's per-op inputs: measured on the multitask run only; single-task scan configs do not name them
    scans = {c.name: c.config["scan"] for _, c in cells if "scan" in c.config}
    assert scans.pop("multitask-s42")["per_op_inputs"] is True
    assert len(scans) == 12 and all("per_op_inputs" not in s for s in scans.values())


def test_the_committed_results_are_the_plans_runs_and_are_restored_without_retraining(tmp_path):
    from sed_lens.experiments.reproduce import restore_results
    from sed_lens.grid import Cell

    root, kept = tmp_path / "out", reproduce.Path(__file__).resolve().parents[1] / "docs" / "reproduction" / "runs"
    coupling, interventions = plan(ReproduceConfig(out=str(root)))
    grid = [Cell(str((path / c.name).relative_to(root)), c.target, c.config) for path, c in all_cells(coupling, interventions)]
    committed = sorted(kept.rglob("*.json"))
    assert committed and restore_results(grid, root, kept) == len(committed)
    for path in committed:  # the scan configs byte for byte (the rest differs in where runs are logged only)
        name = path.relative_to(kept).with_suffix("").as_posix()
        cell, config = next(c for c in grid if c.name == name), json.loads(path.read_text())["config"]
        assert json.dumps(cell.config.get("scan")) == json.dumps(config.get("scan")), name


def test_seeds_option_restricts_every_experiment_and_keeps_the_runs(tmp_path):
    full = {(str(p), c.name): c.config for p, c in all_cells(*plan(ReproduceConfig(out=str(tmp_path))))}
    coupling, interventions = plan(ReproduceConfig(out=str(tmp_path), seeds=(42,)))
    assert coupling.seeds == (42,) and all(iv.seeds == (42,) for iv in interventions)
    one = all_cells(coupling, interventions)
    # The one-seed report reads exactly the seed-42 runs of the full reproduction (same names, same configs).
    assert len(one) == 5 + 2 * (5 + 4)
    assert all(full[(str(p), c.name)] == c.config for p, c in one)
    # So does any other subset: a run's config never depends on which other seeds were asked for (the ablations
    # stay on add seed 42; with --seeds 137 they once moved onto add-s137, a run the full protocol never has).
    for seeds in [(137,), (2024, 137), (137, 42)]:
        some = all_cells(*plan(ReproduceConfig(out=str(tmp_path), seeds=seeds)))
        assert len(some) == len(seeds) * (4 + 2 * (5 + 4)) + 1  # + the multitask run (--multitask-seeds 42)
        assert all(full[(str(p), c.name)] == c.config for p, c in some), seeds
        ablated = [c.name for _, c in some if "scan" in c.config and c.config["scan"]["ablation_windows"]]
        assert ablated == (["add-s42"] if 42 in seeds else []), seeds


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
    assert claims["gradient_over_update_min/stop_rule"] > 5  # gradient SED couples far more strongly than update SED
    assert claims["gradient_over_update_min/post_grok"] > 5
    assert claims["per_op_over_aggregated_min"] > 2  # per-op gradient SED above the aggregated update SED
    assert claims["keep_speedup_min"] > 1  # keeping a rank-3 subspace speeds grokking
    text = (out / "REPRODUCTION.md").read_text()
    for row in ("single-task gradient-SED peak R̄, exact", "the paper's method (central difference", "window ablation",
                "ε ablation", "per-op gradient SED", "gradient projection, add", "Run length is what moves"):
        assert row in text, row
    kept = sorted(p.relative_to(out / "results").as_posix() for p in (out / "results").rglob("*.json"))
    assert "coupling/cells/add-s42.json" in kept and len(kept) == summary["meta"]["runs"]
    page = (out / "REPRODUCTION.html").read_text()  # the same report, one self-contained page
    assert "single-task gradient-SED peak R̄" in page and page.count("data:image/png;base64,") == text.count("\n![")
    assert "![" in text and all((out / line.split("](")[1].rstrip(")\n")).is_file()
                                for line in text.splitlines() if line.startswith("!["))
    # The report again from the kept results alone, without training: the same text.
    again = tmp_path / "again" / "REPRODUCTION.md"
    assert run_cli(reproduce.main, ["--quick", "--out", str(out), "--report-only", "--report", str(again)]) == 0
    assert again.read_text().replace(str(again), "R") == text.replace(str(out / "REPRODUCTION.md"), "R")


def test_finished_runs_are_kept_as_they_finish_and_restored_without_retraining(tmp_path):
    from sed_lens.experiments.reproduce import keep_result, restore_results
    from sed_lens.grid import Cell, run_grid

    config = {"p": 7, "seed": 0, "wandb_mode": "disabled", "sed": [],
              "train": {"steps": 10, "eval_every": 5, "checkpoint_every": 0}}
    grid = [Cell("grid/a", "sed_lens.experiments.grokking:grid_cell", config)]
    root, kept = tmp_path / "runs", tmp_path / "kept"
    seen = []
    first = run_grid(grid, root, workers=1, progress=False,
                     on_done=lambda r: (seen.append(r.name), keep_result(r, root, kept)))
    assert seen == ["grid/a"] and (kept / "grid" / "a.json").is_file()
    # A fresh machine: no run directories, only the kept results (as committed in docs/reproduction/runs).
    import shutil

    shutil.rmtree(root)
    assert restore_results(grid, root, kept) == 1
    again = run_grid(grid, root, workers=1, progress=False)
    assert again[0].skipped and again[0].summary == first[0].summary
    # Kept results of other settings are not restored (the run is trained again).
    shutil.rmtree(root)
    other = [Cell("grid/a", grid[0].target, {**config, "seed": 1})]
    assert restore_results(other, root, kept) == 0


def test_only_selects_runs_by_name_pattern_in_plan_order(tmp_path, capsys):
    from sed_lens.errors import SedLensError
    from sed_lens.experiments.reproduce import select
    from sed_lens.grid import Cell

    root = tmp_path / "out"
    coupling, interventions = plan(ReproduceConfig(out=str(root)))
    grid = [Cell(str((path / c.name).relative_to(root)), c.target, c.config) for path, c in all_cells(coupling, interventions)]
    assert select(grid, ()) == grid
    names = [c.name for c in select(grid, ["coupling/cells/*-s137", "intervention/mul-update/B-*"])]
    assert set(names) == {f"coupling/cells/{op}-s137" for op in ("add", "sub", "mul", "sq")} | {
        f"intervention/mul-update/B-remove-sed-s{s}" for s in (42, 137, 2024)}
    order = [c.name for c in grid]
    assert names == sorted(names, key=order.index)  # the plan's order (seed by seed), not the patterns'
    with pytest.raises(SedLensError, match="--only 'coupling/cells/div-s42' matches no run"):
        select(grid, ["coupling/cells/div-s42"])
    code = run_cli(reproduce.main, ["--only", "nope", "--out", str(root), "--wandb-mode", "disabled"])
    assert code == 2 and "matches no run" in capsys.readouterr().err


def test_compile_option_compiles_every_runs_training_and_leaves_the_eager_configs_as_they_were(tmp_path):
    eager = {c.name: c.config for _, c in all_cells(*plan(ReproduceConfig(out=str(tmp_path))))}
    compiled = {c.name: c.config for _, c in all_cells(*plan(ReproduceConfig(out=str(tmp_path), compile=True)))}
    assert compiled.keys() == eager.keys()
    for name, config in compiled.items():
        train = config["grokking"]["train"]
        assert train["compile"] is True, name
        # an eager run's config does not name the option (kept results made before it existed still match) …
        assert "compile" not in json.dumps(eager[name]), name
        # … and differs from the compiled run's in that option only
        train.pop("compile")
        assert config == eager[name], name
    quick_coupling, quick_interventions = plan(ReproduceConfig(out=str(tmp_path), quick=True, compile=True))
    assert quick_coupling.train.compile and all(iv.train.compile for iv in quick_interventions)
