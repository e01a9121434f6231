import json

import pytest

from sed_lens.errors import SedLensError
from sed_lens.tracking import Run, read_jsonl, to_jsonable


def test_run_directory_files(tmp_path):
    with Run(tmp_path / "r", {"a": 1}, wandb_mode="disabled") as run:
        run.log({"x": 1.5, "nan": float("nan")}, step=0)
        run.log({"x": 2.5}, step=25)
        run.summary({"grok_step": {"add": 25}})
        run.summary({"wall": 3})
    assert json.loads((tmp_path / "r" / "config.json").read_text()) == {"a": 1}
    assert read_jsonl(tmp_path / "r" / "metrics.jsonl") == [{"step": 0, "x": 1.5, "nan": None}, {"step": 25, "x": 2.5}]
    assert json.loads((tmp_path / "r" / "summary.json").read_text()) == {"grok_step": {"add": 25}, "wall": 3}


def test_offline_wandb_run_holds_the_logged_metrics(tmp_path):
    with Run(tmp_path / "w", {"lr": 0.1}, wandb_mode="offline", project="sed-lens-test") as run:
        run.log({"test/acc": 0.5}, step=3)
        run_id = run.wandb_id
        assert run.wandb_run is not None
    files = list((tmp_path / "w" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 1 and files[0].stat().st_size > 0
    assert "wandb sync" in run.sync_hint()


def test_wandb_failure_is_reported_once_and_the_run_continues(tmp_path, monkeypatch):
    import wandb

    def broken(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(wandb, "init", broken)
    with pytest.warns(RuntimeWarning, match="W&B start failed") as rec:
        run = Run(tmp_path / "f", {}, wandb_mode="online")
    run.log({"x": 1}, step=1)
    run.finish()
    assert len(rec) == 1 and run.wandb_run is None and run.sync_hint() is None
    assert read_jsonl(tmp_path / "f" / "metrics.jsonl") == [{"step": 1, "x": 1}]


def test_run_errors(tmp_path):
    with pytest.raises(SedLensError, match="unknown W&B mode"):
        Run(tmp_path / "x", {}, wandb_mode="sometimes")
    with pytest.raises(SedLensError, match="does not exist"):
        Run(tmp_path / "missing", {}, wandb_mode="disabled", resume=True)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SedLensError, match="cannot write to run directory"):
        Run(blocker / "sub", {}, wandb_mode="disabled")


def test_to_jsonable():
    import numpy as np
    import torch

    assert to_jsonable({"t": torch.tensor([1.0, 2.0]), "n": np.float32(0.5), "i": float("inf")}) == \
        {"t": [1.0, 2.0], "n": 0.5, "i": None}
