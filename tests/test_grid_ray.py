"""The Ray backend of the grid runner: same results as the local backend; clear errors without Ray or a cluster."""

import json
import os
import re
import sys
from pathlib import Path

import pytest

from sed_lens.cli import run_cli
from sed_lens.errors import SedLensError
from sed_lens.experiments import coupling as coupling_exp
from sed_lens.grid import Cell, check_ray_address, ray_runtime_env, run_grid

TARGET = "sed_lens.experiments.grokking:grid_cell"


def cell(name, seed, **kw):
    return Cell(name, TARGET, {"p": 7, "seed": seed, "wandb_mode": "disabled",
                               "train": {"steps": 10, "eval_every": 5, "checkpoint_every": 0}, **kw})


@pytest.mark.slow
def test_a_grid_on_a_local_ray_gives_the_same_results_as_the_local_backend(tmp_path):
    ray = pytest.importorskip("ray")
    cells = [cell("a", 3), cell("b", 4)]
    local = run_grid(cells, tmp_path / "local", workers=1, progress=False)
    on_ray = run_grid(cells, tmp_path / "ray", backend="ray", workers=2, progress=False)
    assert [r.error for r in on_ray] == [None, None], on_ray
    assert [r.summary["final"] for r in on_ray] == [r.summary["final"] for r in local]  # single-threaded: bit-identical
    assert [r.summary["grok_step"] for r in on_ray] == [r.summary["grok_step"] for r in local]
    assert all((tmp_path / "ray" / c.name / "grokking.png").is_file() for c in cells)  # each cell is a full run dir
    assert not ray.is_initialized()  # the grid shut down the Ray it started
    again = run_grid(cells, tmp_path / "ray", backend="ray", progress=False)
    assert [r.skipped for r in again] == [True, True] and not ray.is_initialized()  # nothing to do: Ray not started


def test_the_ray_backend_without_ray_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(SedLensError, match=r'needs Ray: pip install "sed-lens\[distributed\]"'):
        run_grid([cell("a", 0)], tmp_path, backend="ray", progress=False)
    assert not (tmp_path / "a").exists()


def test_coupling_cli_with_ray_missing_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)
    code = run_cli(coupling_exp.main, ["--p", "7", "--ops", "add", "--seeds", "1", "--backend", "ray",
                                       "--out", str(tmp_path), "--wandb-mode", "disabled", "--no-progress"],
                   prog="coupling")
    err = capsys.readouterr().err
    assert code == 2 and "needs Ray" in err and len(err.strip().splitlines()) == 1


def test_an_unreachable_or_malformed_ray_address_fails_fast(tmp_path):
    pytest.importorskip("ray")
    with pytest.raises(SedLensError, match="cannot reach the Ray cluster at 127.0.0.1:9"):
        run_grid([cell("a", 0)], tmp_path, backend="ray", ray_address="127.0.0.1:9", progress=False)
    with pytest.raises(SedLensError, match="must be HOST:PORT"):
        check_ray_address("somewhere")
    check_ray_address("auto")  # Ray resolves it itself


def test_ray_workers_get_this_checkout_on_their_path():
    import sed_lens

    src = Path(sed_lens.__file__).resolve().parent.parent
    assert ray_runtime_env()["env_vars"]["PYTHONPATH"].split(os.pathsep)[0] == str(src)


# --- sweep specs for `wandb agent` ------------------------------------------------------------------------------

SWEEPS = Path(__file__).resolve().parent.parent / "experiments" / "sweeps"


def sweep_configs(name, cls):
    """The config of every job of a grid sweep, from the flags `wandb agent` renders for it (its own renderer)."""
    import itertools

    import yaml
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    from sed_lens.cli import config_from_args, parser_for

    spec = yaml.safe_load((SWEEPS / name).read_text())
    module = f"sed_lens.experiments.{name.removesuffix('.yaml')}"
    assert spec["method"] == "grid" and (SWEEPS.parent.parent / spec["program"]).is_file()
    cmd = spec["command"]
    assert cmd[:4] == ["${env}", "${interpreter}", "-m", module] and cmd[-1] == "${args}"
    grid = {k: v["values"] if "values" in v else [v["value"]] for k, v in spec["parameters"].items()}
    ap = parser_for(cls, module, "")
    out = []
    for combo in itertools.product(*grid.values()):
        flags = create_sweep_command_args({"args": {k: {"value": v} for k, v in zip(grid, combo, strict=True)}})["args"]
        out.append(config_from_args(cls, ap.parse_args([*cmd[4:-1], *flags])))
    return out


def test_the_grokking_sweep_runs_every_op_and_seed_online():
    from sed_lens.experiments.grokking import GrokkingConfig

    jobs = sweep_configs("grokking.yaml", GrokkingConfig)
    assert sorted((c.ops, c.seed) for c in jobs) == sorted(((op,), s) for op in ("add", "sub", "mul", "sq")
                                                           for s in (42, 137, 2024))
    assert all(c.wandb_mode == "online" and not c.progress for c in jobs)


def test_the_coupling_sweep_runs_one_cell_per_job_and_the_aggregate_run_skips_them():
    from sed_lens.cli import config_from_args, parser_for
    from sed_lens.experiments.coupling import CouplingConfig, cells

    jobs = sweep_configs("coupling.yaml", CouplingConfig)
    job_cells = [c for cfg in jobs for c in cells(cfg)]
    assert len(job_cells) == len(jobs) == 12 and len({c.name for c in job_cells}) == 12
    assert all(not cfg.aggregate and cfg.out == "runs/coupling" and cfg.wandb_mode == "online" for cfg in jobs)
    # the aggregation command the spec documents sees exactly these cells (same configs: skipped, not rerun)
    [documented] = re.findall(r"^#\s+python -m sed_lens\.experiments\.coupling (.+)$", (SWEEPS / "coupling.yaml").read_text(), re.M)
    agg = config_from_args(CouplingConfig, parser_for(CouplingConfig, "c", "").parse_args(documented.split()))
    assert agg.aggregate and agg.out == "runs/coupling"
    assert sorted((c.name, json.dumps(c.config, sort_keys=True)) for c in cells(agg)) == \
        sorted((c.name, json.dumps(c.config, sort_keys=True)) for c in job_cells)
