"""The benchmark scripts' command lines (the benchmarks themselves run with ``python -m benchmarks.run_all``)."""

import importlib
import sys

import pytest

from benchmarks import run_all

MODULES = [module for _, module, _ in run_all.SECTIONS] + ["benchmarks.run_all"]


@pytest.mark.parametrize("module", MODULES)
def test_a_bad_flag_is_one_line_and_exit_2(module, monkeypatch, capsys):
    main = importlib.import_module(module).main
    monkeypatch.setattr(sys, "argv", [module, "--no-such-flag"])
    with pytest.raises(SystemExit) as e:
        main()
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip().count("\n") == 0 and "--no-such-flag" in err


def test_run_all_writes_the_failure_and_exits_nonzero(tmp_path, monkeypatch):
    monkeypatch.setattr(run_all, "SECTIONS", [("Nothing", "benchmarks.no_such_benchmark", [])])
    monkeypatch.setattr(sys, "argv", ["run_all", "--out", str(tmp_path / "B.md")])
    with pytest.raises(SystemExit, match="failed: benchmarks.no_such_benchmark"):
        run_all.main()
    assert "FAILED" in (tmp_path / "B.md").read_text()


def test_protocol_profile_adds_up_the_runs_own_timings(tmp_path):
    import json

    from test_reproduction_report import coupling_cell, intervention_cell

    from benchmarks.protocol_profile import profile

    cell = coupling_cell("add", 42, 120.0, 8.0, 260.0)
    cell["summary"]["train"]["timings"] = {"eval": 40.0, "checkpoint": 5.0}
    cell["summary"]["timings"].update({"scan_parts": {"streams": 20.0, "responses/hvp": 150.0, "responses/fd": 25.0},
                                       "measured_directions": {"hvp": 1000, "fd": 200}})
    (tmp_path / "c.json").write_text(json.dumps(cell))
    (tmp_path / "i.json").write_text(json.dumps(intervention_cell("add", 42, "C", "gradient", 900)))
    times, dirs, n = profile(tmp_path)
    assert n == 2 and dirs == {"hvp": 1000, "fd": 200}
    assert times["coupling runs: optimizer steps"] == 300.0 - 45.0
    assert times["scan: centroid responses, exact (HVP)"] == 150.0
    assert times["scan: other (bookkeeping, loading snapshots)"] == 200.0 - 195.0
    assert sum(times.values()) == 300.0 + 200.0 + 1.0 + 60.0
    # a second training seed: per-seed profiles, and a table that compares them
    late = intervention_cell("add", 137, "C", "gradient", 700)
    late["provenance"] = {"sed_lens_commit": "abc1234", "cpu": "Chip X", "cpu_capability": "AVX2",
                          "started": "2026-12-02T06:00:00Z", "finished": "2026-12-02T06:01:00Z"}
    (tmp_path / "i137.json").write_text(json.dumps(late))
    first = intervention_cell("add", 137, "A", "gradient", 600)
    first["provenance"] = {"sed_lens_commit": "abc1234", "started": "2026-12-02T05:50:00Z",
                           "finished": "2026-12-02T05:59:00Z"}
    (tmp_path / "a137.json").write_text(json.dumps(first))
    assert profile(tmp_path, 42)[0] == times and profile(tmp_path, 137)[2] == 2
    assert profile(tmp_path, 137)[0] == {"intervention runs (training to the grok step)": 120.0}
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "benchmarks.protocol_profile", "--results", str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    # which code each seed ran on, and its wall span (first start to last finish) where every run recorded it
    assert "| 42 | 2 | not recorded | not recorded | — |" in out
    assert "| 137 | 2 | abc1234 | Chip X (AVX2) (1), not recorded (1) | 11 min |" in out


def test_run_all_only_reruns_the_named_benchmarks_and_keeps_the_other_sections(tmp_path, monkeypatch):
    out = tmp_path / "B.md"
    out.write_text("# Benchmarks\n\nold header\n\n## Kept\n\nold table | 1 |\n\n## Rerun\n\nstale\n")
    monkeypatch.setattr(run_all, "SECTIONS", [("Kept", "benchmarks.kept_one", []),
                                              ("Rerun", "benchmarks.cli_latency",
                                               ["--reps", "1", "--clis", "sed_lens.report"])])
    monkeypatch.setattr(sys, "argv", ["run_all", "--out", str(out), "--only", "benchmarks.cli_latency", "--quick"])
    run_all.main()
    text = out.read_text()
    assert "## Kept\n\nold table | 1 |\n" in text and "stale" not in text and "measured 20" in text
    assert "--quick --only benchmarks.cli_latency" in text
    monkeypatch.setattr(sys, "argv", ["run_all", "--out", str(out), "--only", "benchmarks.nope"])
    with pytest.raises(SystemExit):
        run_all.main()


def test_hvp_profile_times_every_op_and_counts_matmul_flops_by_hand():
    import torch

    from benchmarks.hvp_profile import GROUPS, OpTimer, grouped

    a, b, bias = torch.randn(6, 4), torch.randn(4, 5), torch.randn(5)
    x, y = torch.randn(3, 2, 7), torch.randn(3, 7, 2)
    with OpTimer() as timer:
        a @ b
        torch.addmm(bias, a, b)
        torch.bmm(x, y)
        (a * 2).neg()
        a.sum()
    g = grouped(timer)
    dense, batched, elementwise, _, reductions, _ = (g[k] for k in GROUPS)
    assert dense[1] == 2 and dense[2] == 2 * (2 * 6 * 4 * 5)
    assert batched[1] == 1 and batched[2] == 2 * 3 * 2 * 7 * 2
    assert elementwise[1] == 2 and elementwise[2] == 0 and reductions[1] == 1
    assert all(v[0] >= 0 for v in g.values()) and sum(v[0] for v in g.values()) > 0
