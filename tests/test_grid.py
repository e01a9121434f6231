import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch

from sed_lens.errors import SedLensError
from sed_lens.experiments.grokking import TRACKING_KEYS
from sed_lens.grid import PROVENANCE_TIME, Cell, is_complete, raise_failures, resumable, run_grid
from sed_lens.tracking import git_commit

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
    prov = saved["provenance"]  # which code made the numbers, and when: what a kept result cannot say otherwise
    assert prov["sed_lens_commit"] == git_commit() and prov["torch"] == torch.__version__ and prov["threads"] == 1
    # the CPU: a rerun is bit-identical only on a CPU whose kernels round the same way
    assert prov["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and prov["cpu"]
    started, finished = (datetime.strptime(prov[k], PROVENANCE_TIME) for k in ("started", "finished"))
    assert started <= finished and abs(time.time() - finished.replace(tzinfo=UTC).timestamp()) < 120
    (tmp_path / "s1" / "cell.json").unlink()  # as if s1 had been killed before finishing
    second = run_grid(cells, tmp_path, workers=1, progress=False)
    assert [r.skipped for r in second] == [True, False]
    assert second[1].summary["final"] == first[1].summary["final"]  # deterministic rerun
    with pytest.raises(SedLensError, match="finished run with other settings"):  # never deleted silently
        run_grid([cell("s0", 0, p=11)], tmp_path, workers=1, progress=False)
    assert json.loads((tmp_path / "s0" / "cell.json").read_text())["config"]["p"] == 7
    changed = run_grid([cell("s0", 0, p=11)], tmp_path, workers=1, progress=False, changed="rerun")
    assert not changed[0].skipped  # same name, another config, asked for: run again
    with pytest.raises(SedLensError, match="finished run with other settings"):  # the grid knows no tracking keys
        run_grid([cell("s0", 0, p=11, wandb_mode="offline")], tmp_path, workers=1, progress=False)
    relogged = run_grid([cell("s0", 0, p=11, wandb_mode="offline")], tmp_path, workers=1, progress=False,
                        ignore_keys=TRACKING_KEYS)
    assert relogged[0].skipped  # only where it logs changed (the caller's tracking keys): the run is the same


def test_process_pool_gives_the_same_results_as_in_process(tmp_path):
    cells = [cell("a", 3), cell("b", 4)]
    serial = run_grid(cells, tmp_path / "serial", workers=1, progress=False)
    pooled = run_grid(cells, tmp_path / "pool", workers=2, progress=False)
    assert [r.summary["final"] for r in serial] == [r.summary["final"] for r in pooled]


def test_failed_cells_are_reported_and_others_run(tmp_path):
    cells = [cell("ok", 0), cell("bad", 0, p=1)]
    res = run_grid(cells, tmp_path, workers=1, progress=False)
    assert res[0].error is None and "at least 3" in res[1].error
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


def _children(pid):
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def _alive(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers die with the grid on Linux only")
def test_killing_the_grid_process_ends_its_workers(tmp_path):
    script = textwrap.dedent(f"""
        from sed_lens.grid import Cell, run_grid
        cells = [Cell(f"c{{i}}", {TARGET!r}, {{"p": 97, "seed": i, "wandb_mode": "disabled",
                 "train": {{"steps": 10**6, "eval_every": 10**5, "checkpoint_every": 0}}}}) for i in range(2)]
        run_grid(cells, {str(tmp_path)!r}, workers=2, progress=False)
    """)
    grid = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not all((tmp_path / f"c{i}" / "config.json").is_file() for i in range(2)):
            time.sleep(0.5)  # both workers are training
        workers = _children(grid.pid)
        assert len(workers) >= 2, "the grid's workers did not start"
        grid.send_signal(signal.SIGKILL)
        grid.wait()
        deadline = time.time() + 30
        while time.time() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.2)
        assert not any(_alive(w) for w in workers), "workers outlived the killed grid"
    finally:
        try:  # whatever is left of the grid's process group (it has its own session)
            os.killpg(grid.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@resumable
def counting_target(config, run_dir):
    """A resumable target: counts its attempts in its run directory."""
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    attempts = len(list(path.glob("attempt_*"))) + 1
    (path / f"attempt_{attempts}").write_text("")
    if attempts < config["fail_until"]:
        raise RuntimeError(f"attempt {attempts} killed")
    return {"attempts": attempts}


def test_an_interrupted_resumable_cell_keeps_its_directory_and_a_rerun_starts_over(tmp_path):
    c = Cell("r", "test_grid:counting_target", {"fail_until": 2})
    first = run_grid([c], tmp_path, workers=1, progress=False)
    assert "attempt 1 killed" in first[0].error and (tmp_path / "r" / "attempt_1").is_file()
    second = run_grid([c], tmp_path, workers=1, progress=False)
    assert second[0].summary == {"attempts": 2}  # continued in the same directory, not cleared
    other = Cell("r", "test_grid:counting_target", {"fail_until": 1})
    rerun = run_grid([other], tmp_path, workers=1, progress=False, changed="rerun")
    assert rerun[0].summary == {"attempts": 1}  # a finished run with another config is never continued
