"""Grokking-length runs (marked slow; CI runs them)."""

import json

import pytest

from sed_lens.cli import run_cli
from sed_lens.experiments import grokking


@pytest.mark.slow
def test_grokking_cli_groks_add_at_small_p(tmp_path, capsys):
    # TransformerLens' init groks p=59 in ~700 steps; the paper's setup is the CLI's default (minutes).
    rd = tmp_path / "g"
    code = run_cli(grokking.main, ["--p", "59", "--init", "tl", "--batch-size", "256", "--stop-patience", "2",
                                   "--steps", "3000", "--run-dir", str(rd), "--wandb-mode", "offline",
                                   "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    summary = json.loads((rd / "summary.json").read_text())
    assert summary["grok_step"]["add"] is not None and summary["grok_step"]["add"] < summary["steps"]
    assert summary["stopped_early"] and summary["final"]["test/acc/add"] >= 0.98
    assert f"grok step {summary['grok_step']['add']}" in out
    assert list((rd / "wandb").glob("offline-run-*"))
