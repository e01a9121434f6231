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
    rows = read_jsonl(tmp_path / "r" / "metrics.jsonl")
    assert [without_timing(r) for r in rows] == [{"step": 0, "x": 1.5, "nan": None}, {"step": 25, "x": 2.5}]
    assert all(isinstance(r["wall_time"], float) and r["wall_time"] >= 0 for r in rows)
    assert json.loads((tmp_path / "r" / "summary.json").read_text()) == {"grok_step": {"add": 25}, "wall": 3}


def without_timing(row):
    return {k: v for k, v in row.items() if "time" not in k}


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
    assert [without_timing(r) for r in read_jsonl(tmp_path / "b" / "metrics.jsonl")] == [{"step": 1, "x": 1}]


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
        run = Run(tmp_path / "f", {}, wandb_mode="offline")
    run.log({"x": 1}, step=1)
    run.finish()
    assert len(rec) == 1 and run.wandb_run is None and run.sync_hint() is None
    assert [without_timing(r) for r in read_jsonl(tmp_path / "f" / "metrics.jsonl")] == [{"step": 1, "x": 1}]


def test_online_without_network_falls_back_to_an_offline_run_to_sync_later(tmp_path, monkeypatch):
    import wandb

    modes = []

    class Offline(_BrokenWandb):
        def __init__(self, id):
            self.id = id

        def log(self, *a, **k):
            pass

        def finish(self):
            pass

    def init(**kw):
        modes.append(kw["mode"])
        if kw["mode"] == "online":
            raise ConnectionError("no network")
        return Offline(kw["id"])

    monkeypatch.setattr(wandb, "init", init)
    with pytest.warns(RuntimeWarning, match="could not start online.*offline W&B run in .*wandb sync") as rec:
        run = Run(tmp_path / "o", {}, wandb_mode="online", name="my-run")
    run.log({"x": 1}, step=1)
    assert run.describe_wandb().startswith("W&B offline run my-run")
    run.finish()
    assert modes == ["online", "offline"] and len(rec) == 1
    assert run.wandb_mode == "offline" and "wandb sync" in run.sync_hint()
    meta = json.loads((tmp_path / "o" / "run.json").read_text())
    assert meta["wandb_mode"] == "offline" and meta["wandb_mode_requested"] == "online"


def test_a_torn_last_metrics_line_is_dropped_with_a_warning_elsewhere_it_is_an_error(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "x": 1}\n{"step": 10, "x": 2}\n{"step": 20, "x"')
    with pytest.warns(RuntimeWarning, match="dropped its truncated last line 3"):
        assert read_jsonl(path) == [{"step": 0, "x": 1}, {"step": 10, "x": 2}]
    path.write_text('{"step": 0, "x": 1}\n{"step": 10, "x\n{"step": 20, "x": 3}\n')
    with pytest.raises(SedLensError, match="line 2 is not valid JSON and is not the last line") as e:
        read_jsonl(path)
    assert "\n" not in str(e.value)


def test_resuming_a_run_repairs_a_torn_metrics_tail_and_continues_the_wall_time(tmp_path):
    with Run(tmp_path / "r", {}, wandb_mode="disabled") as run:
        run.log({"x": 1}, step=0)
    metrics = tmp_path / "r" / "metrics.jsonl"
    first = read_jsonl(metrics)[0]["wall_time"]
    metrics.write_text(metrics.read_text() + '{"step": 5, "x": 2, "wall')
    with pytest.warns(RuntimeWarning, match="truncated last line"):
        run = Run(tmp_path / "r", {}, wandb_mode="disabled", resume=True)
    run.log({"x": 3}, step=5)
    run.finish()
    rows = read_jsonl(metrics)
    assert [r["step"] for r in rows] == [0, 5] and rows[1]["wall_time"] >= first


def test_run_files_honour_the_umask(tmp_path):
    import os
    import stat

    old = os.umask(0o027)
    try:
        with Run(tmp_path / "u", {"a": 1}, wandb_mode="disabled") as run:
            run.summary({"b": 2})
        for name in ("config.json", "run.json", "summary.json"):
            assert stat.S_IMODE((tmp_path / "u" / name).stat().st_mode) == 0o640, name
        os.umask(0o002)
        run = Run(tmp_path / "v", {}, wandb_mode="disabled")
        run.finish()
        assert stat.S_IMODE((tmp_path / "v" / "config.json").stat().st_mode) == 0o664
    finally:
        os.umask(old)


def test_run_json_records_the_version_the_commit_and_keeps_the_command_over_resumes(tmp_path, monkeypatch):
    import sed_lens
    from sed_lens import tracking

    Run(tmp_path / "g", {}, wandb_mode="disabled").finish()
    meta = json.loads((tmp_path / "g" / "run.json").read_text())
    assert meta["sed_lens_version"] == sed_lens.__version__
    assert meta["git_commit"] == tracking.git_commit()  # a short hash in a git checkout, None otherwise
    monkeypatch.setattr(tracking.sys, "argv", ["later", "--resume"])
    Run(tmp_path / "g", {}, wandb_mode="disabled", resume=True).finish()
    again = json.loads((tmp_path / "g" / "run.json").read_text())
    assert again["command"] == meta["command"] and again["resumes"][0]["command"] == "later --resume"


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


# --- what the experiments log to W&B (offline runs, read back from their files) ---------------------------------


def test_a_grokking_run_logs_metrics_figures_and_an_artifact(tmp_path, monkeypatch):
    from sed_lens.cli import run_cli
    from sed_lens.experiments import grokking

    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    rd = tmp_path / "g"
    assert run_cli(grokking.main, ["--p", "7", "--steps", "10", "--eval-every", "5", "--sed", "gradient",
                                   "--sed-window", "3", "--sed-k", "2", "--sed-every", "5", "--run-dir", str(rd),
                                   "--no-progress", "--checkpoint-every", "0", "--wandb-project", "sed-lens-test"]) == 0
    w = read_offline_run(rd)
    assert w.complete and w.job_type == "grokking" and w.config["p"] == 7
    rows = read_jsonl(rd / "metrics.jsonl")
    for key in ("test/acc/add", "train/loss/add", "sed/gradient/sigma_1", "sed/gradient/gap_1"):
        assert w.metric(key) == [(r["step"], r[key]) for r in rows if key in r], key
    for key, name in (("figures/grokking", "grokking.png"), ("figures/sed_spectra", "sed_spectra.png")):
        [img] = w.images(key)
        assert img.read_bytes() == (rd / name).read_bytes()
    [art] = [a for a in w.artifacts if a["type"] == "grokking-run"]
    assert sorted(art["files"]) == ["config.json", "model.json", "sed_bases.pt", "summary.json"]
    assert art["metadata"]["steps"] == 10
    assert w.summary["grok_step"] == json.loads((rd / "summary.json").read_text())["grok_step"]


def test_coupling_runs_log_every_R_their_figures_bases_and_a_summary_run(tmp_path, monkeypatch):
    import torch

    from sed_lens.cli import run_cli
    from sed_lens.experiments import coupling

    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))
    out = tmp_path / "c"
    assert run_cli(coupling.main, ["--p", "7", "--ops", "add", "--seeds", "1", "--steps", "20", "--every", "4",
                                   "--n-snapshots", "3", "--window", "2", "--k", "1", "--n-probes", "8",
                                   "--n-random", "3", "--eval-every", "10", "--eps-ablation", "--out", str(out),
                                   "--no-progress", "--workers", "1", "--wandb-project", "sed-lens-test"]) == 0
    cell = out / "cells" / "add-s1"
    local = json.loads((cell / "coupling.json").read_text())
    w = read_offline_run(cell)
    assert w.complete and w.job_type == "coupling"
    columns, rows = w.table("coupling/R")
    assert (columns, rows) == tuple(to_jsonable(coupling.coupling_table(local, 1)))
    n_keys = sum(len([k for k in s["ops"]["add"] if k != "random"]) for s in local["snapshots"])
    assert len(rows) == n_keys and columns[:7] == ["op", "seed", "step", "key", "source", "align", "variant"]
    series = [(r["step"], r["ops"]["add"]["gradient/leading"]["R_mean"]) for r in local["snapshots"]]
    key = "coupling/add/gradient/leading/R_mean"
    assert [(row["coupling/step"], row[key]) for row in w.history if key in row] == series  # R̄ over the step
    assert not any("fd_eps" in k for row in w.history for k in row)  # ablations are in the table only
    [img] = w.images("figures/coupling_add")
    assert img.read_bytes() == (cell / "coupling_add.png").read_bytes()
    [art] = [a for a in w.artifacts if a["type"] == "coupling"]
    assert sorted(art["files"]) == ["config.json", "coupling.json", "sed_bases.pt", "summary.json"]  # no artifacts/
    # the SED bases at each key's peak and final snapshot, as measured
    bases = torch.load(cell / "sed_bases.pt", weights_only=True)
    s = local["summary"]["add"]["gradient/leading"]
    assert bases["selected"]["add"]["gradient/leading"] == {"peak": s["peak_step"], "final": s["final_step"]}
    snap = torch.load(cell / "artifacts" / f"snapshot_{s['peak_step']:06d}.pt", weights_only=True)
    assert torch.equal(bases["bases"]["gradient/leading"][s["peak_step"]], snap["directions"]["gradient/leading"])
    # the aggregate's own run: the summary tables beside the paper's, the figures, coupling.json + .md
    [summary_dir] = list((out / "summary").iterdir())
    sw = read_offline_run(summary_dir)
    assert sw.complete and sw.job_type == "coupling-summary"
    agg = json.loads((out / "coupling.json").read_text())["aggregate"]
    cols, single = sw.table("coupling/summary/single")
    assert dict(zip(cols, single[0], strict=True))["gradient_peak_R_mean"] == agg["single"]["add-s1"]["gradient_peak"]
    cols, eps = sw.table("coupling/summary/eps_ablation")
    assert [r[0] for r in eps] == ["0.001", "0.005", "0.05", "→ 0 (exact JVP)"] and [r[2] for r in eps] == [221, 212, 74, None]
    assert {k for r in sw.history for k in r if k.startswith("figures/")} == {"figures/coupling_single", "figures/eps_ablation"}
    [art] = [a for a in sw.artifacts if a["type"] == "coupling-summary"]
    assert sorted(art["files"]) == ["coupling.json", "coupling.md"]


def test_coupling_without_aggregate_only_runs_the_cells(tmp_path, capsys):
    from sed_lens.cli import run_cli
    from sed_lens.experiments import coupling

    out = tmp_path / "c"
    argv = ["--p", "7", "--ops", "add", "--seeds", "1", "--steps", "8", "--every", "4", "--n-snapshots", "2",
            "--window", "2", "--k", "1", "--n-probes", "4", "--n-random", "2", "--eval-every", "4", "--out", str(out),
            "--no-progress", "--workers", "1", "--wandb-mode", "disabled", "--no-aggregate"]
    assert run_cli(coupling.main, argv) == 0
    assert (out / "cells" / "add-s1" / "cell.json").is_file() and not (out / "coupling.json").exists()
    assert "not aggregated" in capsys.readouterr().out
    assert run_cli(coupling.main, argv[:-1]) == 0  # the same grid again: the cell is skipped, the aggregate written
    assert (out / "coupling.json").is_file() and not (out / "summary").exists()  # W&B disabled: no summary run
