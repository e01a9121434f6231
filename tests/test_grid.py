import json

import pytest

from sed_lens.errors import SedLensError
from sed_lens.grid import Cell, is_complete, raise_failures, run_grid

TARGET = "sed_lens.experiments.grokking:grid_cell"


def cell(name, seed, **kw):
    return Cell(name, TARGET, {"p": 7, "seed": seed, "wandb_mode": "disabled",
                               "train": {"steps": 10, "eval_every": 5, "checkpoint_every": 0}, **kw})


def test_local_grid_runs_cells_skips_complete_ones_and_reruns_interrupted(tmp_path):
    cells = [cell("s0", 0), cell("s1", 1)]
    first = run_grid(cells, tmp_path, workers=1, progress=False)
    assert [r.skipped for r in first] == [False, False] and all(r.error is None for r in first)
    assert all(is_complete(tmp_path / c.name) for c in cells)
    assert first[0].summary["steps"] == 10
    saved = json.loads((tmp_path / "s0" / "cell.json").read_text())
    assert saved["config"]["seed"] == 0 and saved["summary"] == first[0].summary
    (tmp_path / "s1" / "cell.json").unlink()  # as if s1 had been killed before finishing
    second = run_grid(cells, tmp_path, workers=1, progress=False)
    assert [r.skipped for r in second] == [True, False]
    assert second[1].summary["final"] == first[1].summary["final"]  # deterministic rerun
    changed = run_grid([cell("s0", 0, p=11)], tmp_path, workers=1, progress=False)
    assert not changed[0].skipped  # same name, another config: run again
    relogged = run_grid([cell("s0", 0, p=11, wandb_mode="offline")], tmp_path, workers=1, progress=False)
    assert relogged[0].skipped  # only where it logs changed: the run is the same


def test_process_pool_gives_the_same_results_as_in_process(tmp_path):
    cells = [cell("a", 3), cell("b", 4)]
    serial = run_grid(cells, tmp_path / "serial", workers=1, progress=False)
    pooled = run_grid(cells, tmp_path / "pool", workers=2, progress=False)
    assert [r.summary["final"] for r in serial] == [r.summary["final"] for r in pooled]


def test_failed_cells_are_reported_and_others_run(tmp_path):
    cells = [cell("ok", 0), cell("bad", 0, p=1)]
    res = run_grid(cells, tmp_path, workers=1, progress=False)
    assert res[0].error is None and "at least 2" in res[1].error
    with pytest.raises(SedLensError, match="1 of 2 grid cells failed \\(bad\\)"):
        raise_failures(res)


def test_grid_errors(tmp_path):
    with pytest.raises(SedLensError, match="unknown grid backend"):
        run_grid([], tmp_path, backend="slurm")
    with pytest.raises(SedLensError, match="distinct names"):
        run_grid([cell("x", 0), cell("x", 1)], tmp_path)
    with pytest.raises(SedLensError, match="cannot import"):
        run_grid([Cell("x", "sed_lens.nothing:here")], tmp_path)
    with pytest.raises(SedLensError, match="package.module:function"):
        run_grid([Cell("x", "nocolon")], tmp_path)
