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
