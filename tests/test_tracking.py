import json

import pytest

from sed_lens.errors import SedLensError
from sed_lens.tracking import Run, artifact_name, read_jsonl, to_jsonable
from sed_lens.wandb_offline import read_offline_run


def test_run_directory_files(tmp_path):
    with Run(tmp_path / "r", {"a": 1}, wandb_mode="disabled") as run:
        run.log({"x": 1.5, "nan": float("nan")}, step=0)
        run.log({"x": 2.5}, step=25)
        run.summary({"grok_step": {"add": 25}})
        run.summary({"wall": 3})
    assert json.loads((tmp_path / "r" / "config.json").read_text()) == {"a": 1}
    assert read_jsonl(tmp_path / "r" / "metrics.jsonl") == [{"step": 0, "x": 1.5, "nan": None}, {"step": 25, "x": 2.5}]
    assert json.loads((tmp_path / "r" / "summary.json").read_text()) == {"grok_step": {"add": 25}, "wall": 3}


def _png(path):
    from sed_lens import plots

    return plots.ablation([1, 2], [3.0, 4.0], path, "x", "a figure")


def test_offline_wandb_run_holds_metrics_tables_images_and_artifacts(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))  # artifact staging stays in tmp
    png = _png(tmp_path / "fig.png")
    (tmp_path / "bases").mkdir()
    (tmp_path / "bases" / "b.json").write_text("{}")
    with Run(tmp_path / "w", {"lr": 0.1, "ops": ["add"]}, wandb_mode="offline", project="sed-lens-test",
             job_type="unit") as run:
        run.log({"test/acc": 0.5, "sed/gradient/sigma_1": 2.0}, step=3)
        run.log({"test/acc": 0.75, "sed/gradient/sigma_1": 1.5}, step=6)
        run.log_table("coupling/R", ["op", "step", "R_1"], [["add", 3, 12.5], ["add", 6, float("nan")]])
        run.log_images({"figures/fig": png})
        run.log_artifact("grokking-add+sub p97", "sed-bases", [png, tmp_path / "bases"], {"k": 3})
        run.summary({"grok_step": {"add": 6}})
        run_id = run.wandb_id
    assert "wandb sync" in run.sync_hint()
    w = read_offline_run(tmp_path / "w")
    assert w.complete and w.run_id == run_id and w.project == "sed-lens-test" and w.job_type == "unit"
    assert w.config["lr"] == 0.1 and w.config["ops"] == ["add"]
    assert w.metric("test/acc") == [(3, 0.5), (6, 0.75)]
    assert w.metric("sed/gradient/sigma_1") == [(3, 2.0), (6, 1.5)]
    assert w.table("coupling/R") == (["op", "step", "R_1"], [["add", 3, 12.5], ["add", 6, None]])
    [img] = w.images("figures/fig")
    assert img.read_bytes() == png.read_bytes()
    [art] = [a for a in w.artifacts if a["type"] == "sed-bases"]
    assert art["name"] == "grokking-add-sub-p97" and art["metadata"] == {"k": 3}
    assert sorted(art["files"]) == ["bases/b.json", "fig.png"]
    assert w.summary["grok_step"] == {"add": 6}
    with pytest.raises(SedLensError, match="logged no table"):
        w.table("nothing")


def test_offline_reader_errors(tmp_path):
    with pytest.raises(SedLensError, match="holds no offline W&B run"):
        read_offline_run(tmp_path)
    d = tmp_path / "wandb" / "offline-run-1-x"
    d.mkdir(parents=True)
    with pytest.raises(SedLensError, match="no W&B transaction log"):
        read_offline_run(tmp_path, wait=0)
    (d / "run-x.wandb").write_bytes(b"not a log")
    with pytest.raises(SedLensError, match="not a W&B transaction log"):
        read_offline_run(tmp_path, wait=0)


class _BrokenWandb:
    """Stands in for a live W&B run whose every call fails (a full disk, a dropped connection)."""

    id = "broken00"
    calls = 0

    def log(self, *a, **k):
        _BrokenWandb.calls += 1
        raise OSError("disk full")

    def finish(self):
        pass


def test_helper_failures_warn_once_and_the_run_continues(tmp_path):
    run = Run(tmp_path / "b", {}, wandb_mode="disabled")
    run._wandb = _BrokenWandb()
    png = _png(tmp_path / "f.png")
    with pytest.warns(RuntimeWarning, match="W&B table failed") as rec:
        run.log_table("t", ["a"], [[1]])
        run.log_images({"f": png})
        run.log_artifact("a", "x", [png])
        run.log({"x": 1}, step=1)
    run.finish()
    assert len(rec) == 1 and _BrokenWandb.calls == 1 and run.wandb_run is None
    assert read_jsonl(tmp_path / "b" / "metrics.jsonl") == [{"step": 1, "x": 1}]


def test_helpers_reject_bad_inputs_whatever_the_mode(tmp_path):
    with Run(tmp_path / "r", {}, wandb_mode="disabled") as run:
        with pytest.raises(SedLensError, match="row 1 does not have 2 values"):
            run.log_table("t", ["a", "b"], [[1, 2], [3]])
        with pytest.raises(SedLensError, match="no such file"):
            run.log_images({"f": tmp_path / "missing.png"})
        with pytest.raises(SedLensError, match="does not exist"):
            run.log_artifact("a", "x", [tmp_path / "missing.json"])
        with pytest.raises(SedLensError, match="at least one file"):
            run.log_artifact("a", "x", [])


def test_artifact_names_are_made_wandb_safe():
    assert artifact_name("grokking-add+sub-p97-s42") == "grokking-add-sub-p97-s42"
    assert artifact_name("coupling/R (x)") == "coupling-R-x"
    assert artifact_name("+++") == "artifact" and len(artifact_name("a" * 300)) == 128


def test_a_run_id_imposed_by_wandb_is_recorded(tmp_path, monkeypatch):
    """A sweep agent makes W&B ignore the run id sed_lens asks for; run.json must hold the one W&B used."""
    import wandb

    class Imposed(_BrokenWandb):
        id = "sweep123"

        def log(self, *a, **k):
            pass

    monkeypatch.setattr(wandb, "init", lambda **k: Imposed())
    with Run(tmp_path / "s", {}, wandb_mode="online") as run:
        assert run.wandb_id == "sweep123"
    assert json.loads((tmp_path / "s" / "run.json").read_text())["wandb_id"] == "sweep123"


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
