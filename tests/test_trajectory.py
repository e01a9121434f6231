import json

import numpy as np
import pytest
import torch
from cli_helpers import call_main

from sed_lens.analysis.scan_key import ScanKey
from sed_lens.analysis.sed import window_bounds
from sed_lens.analysis.trajectory import (
    ScanConfig,
    TrajectoryScan,
    extended_indices,
    phase_bounds,
    phase_of,
    recompute_artifact,
    scan_coupling,
    snapshot_indices,
    summarize,
)
from sed_lens.cli import run_cli
from sed_lens.errors import SedLensError
from sed_lens.experiments import coupling as coupling_exp
from sed_lens.experiments import grokking
from sed_lens.hooks.capture import gradient_batch
from sed_lens.hooks.snapshots import SnapshotStore
from sed_lens.models import build_model, op_losses
from sed_lens.subspace import ParamSubspace
from sed_lens.tasks import ModularArithmetic
from sed_lens.training import TrainConfig, Trainer


@pytest.fixture(scope="module")
def run():
    task = ModularArithmetic(p=11, ops=("add",), seed=0)
    model = build_model("xu2026", task, seed=0)
    store = SnapshotStore(every=5)
    Trainer(model, task, TrainConfig(steps=40, eval_every=20, checkpoint_every=0), [store], progress=False).fit()
    return task, model, store


def test_snapshot_indices_are_the_papers_linspace():
    assert snapshot_indices(10, 4) == [0, 3, 6, 9]
    idx = snapshot_indices(150, 40)  # 149/39 = 3.82 apart, truncated
    assert len(idx) == 40 and idx[:4] == [0, 3, 7, 11] and idx[-1] == 149
    assert snapshot_indices(5, 40) == [0, 1, 2, 3, 4]


def test_scan_config_rejects_a_bad_method_or_readout_before_any_work():
    with pytest.raises(SedLensError, match="unknown coupling method 'hvpp'"):
        ScanConfig(method="hvpp").validate()
    with pytest.raises(SedLensError, match="unknown centroid readout"):
        ScanConfig(readout="logits").validate()


def test_scan_bases_match_numpy_svd_of_the_streams(run, tmp_path):
    task, model, store = run
    cfg = ScanConfig(n_snapshots=4, window=3, k=2, n_probes=32, n_random=4)
    out = scan_coupling(model, task, store, cfg, artifacts=tmp_path, progress=False)
    assert out["measured"] == [store.steps[i] for i in snapshot_indices(len(store), 4)]
    # independent streams: weight differences and gradients by plain autograd
    S = ParamSubspace.attention(model)
    weights, grads = [], []
    tokens, labels = gradient_batch(task, 512)
    for _, state in store:
        model.load_state_dict(state)
        weights.append(S.weights().clone())
        model.zero_grad()
        op_losses(model, tokens, labels)["add"].backward()
        grads.append(S.grads().clone())
    updates = [b - a for a, b in zip(weights[:-1], weights[1:], strict=True)]
    for row in out["snapshots"]:
        t = row["index"]
        art = torch.load(tmp_path / f"snapshot_{row['step']:06d}.pt", weights_only=True)
        for key, seq, anchor in (("gradient/leading", grads, t), ("gradient/trailing", grads, t),
                                 ("update/leading", updates, t), ("update/trailing", updates, t - 1)):
            if anchor < 0:
                assert key not in art["directions"]
                continue
            lo, hi = window_bounds(anchor, len(seq), 3, ScanKey.parse(key).align)
            vt = np.linalg.svd(torch.stack(seq[lo:hi]).double().numpy(), full_matrices=False)[2][:2]
            got = art["directions"][key].double().numpy()
            r = min(2, hi - lo)
            assert np.all(np.abs((got[:r] * vt[:r]).sum(1)) > 1 - 1e-5), (key, t)
        res = row["ops"]["add"]
        med = float(torch.tensor(res["random"]["A"]).median())
        assert res["gradient/leading"]["R"][0] == pytest.approx(res["gradient/leading"]["A"][0] / med, rel=1e-5)
    s = out["summary"]["add"]["gradient/leading"]
    means = [r["ops"]["add"]["gradient/leading"]["R_mean"] for r in out["snapshots"]]
    assert s["peak_R_mean"] == pytest.approx(max(means)) and s["final_R_mean"] == pytest.approx(means[-1])


def test_artifacts_recompute_every_reported_R(run, tmp_path):
    task, model, store = run
    out = scan_coupling(model, task, store, ScanConfig(n_snapshots=2, window=3, k=2, n_probes=16, n_random=3),
                        artifacts=tmp_path, progress=False)
    for row in out["snapshots"]:
        again = recompute_artifact(tmp_path / f"snapshot_{row['step']:06d}.pt")
        for key, R in again["add"].items():
            np.testing.assert_allclose(R, row["ops"]["add"][key]["R"], rtol=1e-4)
    with pytest.raises(SedLensError, match="not a sed_lens coupling artifact"):
        torch.save({"format": "x"}, tmp_path / "bad.pt")
        recompute_artifact(tmp_path / "bad.pt")


def test_multitask_scan_measures_each_ops_own_stream():
    task = ModularArithmetic(p=7, ops=("add", "mul"), seed=0)
    model = build_model("xu2026", task, seed=0)
    store = SnapshotStore(every=4)
    Trainer(model, task, TrainConfig(steps=16, eval_every=8, checkpoint_every=0), [store], progress=False).fit()
    out = scan_coupling(model, task, store, ScanConfig(n_snapshots=3, window=2, k=1, n_probes=8, n_random=3,
                                                       aligns=("leading",)), progress=False)
    keys_add = set(out["summary"]["add"])
    assert keys_add == {"update/leading", "gradient/leading", "task_gradient/add/leading"}
    assert "task_gradient/mul/leading" in out["summary"]["mul"]


def call(main, argv, capsys):
    return call_main(main, argv, capsys, "coupling")


def test_coupling_cli_end_to_end_and_rerun_skips(tmp_path, capsys):
    argv = ["--p", "7", "--ops", "add", "--seeds", "1", "--steps", "20", "--every", "4", "--n-snapshots", "3",
            "--window", "2", "--k", "1", "--n-probes", "8", "--n-random", "3", "--eval-every", "10",
            "--window-ablation", "--out", str(tmp_path), "--wandb-mode", "disabled", "--no-progress", "--workers", "1"]
    code, out, err = call(coupling_exp.main, argv, capsys)
    assert code == 0, err
    for f in ("coupling.md", "coupling.json", "coupling_single.png", "window_ablation.png"):
        assert (tmp_path / f).is_file(), f
    cell = tmp_path / "cells" / "add-s1"
    assert (cell / "coupling_add.png").is_file() and len(list((cell / "artifacts").glob("snapshot_*.pt"))) == 3
    agg = json.loads((tmp_path / "coupling.json").read_text())["aggregate"]
    assert set(agg["window_ablation"]) == {"1", "2", "5", "10", "20", "40"}
    mtime = (cell / "cell.json").stat().st_mtime
    code, _, _ = call(coupling_exp.main, argv, capsys)
    assert code == 0 and (cell / "cell.json").stat().st_mtime == mtime  # finished runs are skipped


def test_coupling_from_an_existing_grokking_run(tmp_path, capsys):
    rd = tmp_path / "g"
    assert run_cli(grokking.main, ["--p", "7", "--steps", "12", "--snapshot-every", "4", "--run-dir", str(rd),
                                   "--wandb-mode", "disabled", "--no-progress", "--eval-every", "6"]) == 0
    assert len(list((rd / "snapshots").glob("step_*.pt"))) == 4
    code, out, err = call(coupling_exp.main, ["--from-run", str(rd), "--out", str(tmp_path / "c"), "--window", "2",
                                              "--k", "1", "--n-probes", "8", "--n-random", "3", "--no-progress"], capsys)
    assert code == 0, err
    assert (tmp_path / "c" / "from-g" / "coupling.json").is_file() and "peak R̄" in out


@pytest.mark.parametrize("argv,match", [(["--ops", "pow"], "unknown op"), (["--k", "0"], "k <= window"),
                                        (["--method", "exact"], "invalid choice"), (["--seeds", "x"], "invalid"),
                                        (["--no-single"], "nothing to run"), (["--aligns", "centred"], "alignment"),
                                        (["--from-run", "/nonexistent"], "not a grokking run directory")])
def test_coupling_cli_errors(argv, match, capsys, tmp_path):
    code, _, err = call(coupling_exp.main, [*argv, "--out", str(tmp_path)], capsys)
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1


def test_a_snapshot_directory_loads_back_as_the_store_that_wrote_it(tmp_path):
    task = ModularArithmetic(p=7, ops=("add",), seed=0)
    model = build_model("xu2026", task, seed=0)
    written = SnapshotStore(every=3, directory=tmp_path / "snaps")
    Trainer(model, task, TrainConfig(steps=7, eval_every=7, checkpoint_every=0), [written], progress=False).fit()
    loaded = SnapshotStore.load(tmp_path / "snaps", every=3)
    assert loaded.steps == written.steps == [0, 3, 6]
    for (s1, a), (s2, b) in zip(written, loaded, strict=True):
        assert s1 == s2 and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(SedLensError, match="no saved snapshots"):
        SnapshotStore.load(tmp_path, every=3)


def test_extended_indices_continue_the_spacing_to_the_end():
    assert extended_indices([0, 3, 6, 9], 16) == [0, 3, 6, 9, 12, 15]
    assert extended_indices([0, 3, 6, 9], 10) == [0, 3, 6, 9]
    assert extended_indices([0, 4, 8], 11) == [0, 4, 8, 10]  # the last snapshot is always measured


def test_phases_come_from_the_runs_own_accuracy_curve():
    history = [{"step": s, "test/acc/add": a} for s, a in ((0, 0.01), (25, 0.05), (50, 0.3), (75, 0.99), (100, 1.0))]
    assert phase_bounds(history, "add") == (50, 75)
    assert [phase_of(s, (50, 75)) for s in (25, 50, 74, 75, 200)] == ["pre", "transition", "transition", "post", "post"]
    assert phase_bounds(history[:2], "add") == (None, None) and phase_of(10, (None, None)) == "pre"
    rows = [{"step": s, "ops": {"add": {"gradient/leading": {"R": [m], "R_mean": m}}}}
            for s, m in ((0, 1.0), (25, 3.0), (50, 10.0), (60, 20.0), (75, 5.0), (100, 7.0))]
    s = summarize(rows, ["add"], {"add": (50, 75)})["add"]["gradient/leading"]
    assert s["phase_median_R_mean"] == {"pre": 2.0, "transition": 15.0, "post": 6.0}
    assert s["phase_count"] == {"pre": 2, "transition": 2, "post": 2}


def test_a_longer_run_reuses_every_response_it_shares_with_the_shorter_one(run):
    task, model, store = run
    cfg = ScanConfig(window=3, k=2, n_probes=16, n_random=3, analysis_seeds=2, fd_compare=True)
    n_short, n_long = 6, len(store)
    short_idx = snapshot_indices(n_short, 3)
    long_idx = extended_indices(short_idx, n_long)
    engine = TrajectoryScan(model, task, store, cfg, progress=False)
    engine.run(n_short, short_idx)
    cached = engine.run(n_long, long_idx)
    fresh = TrajectoryScan(model, task, store, cfg, progress=False).run(n_long, long_idx)
    for a, b in zip(cached["snapshots"], fresh["snapshots"], strict=True):
        for key, res in b["ops"]["add"].items():
            if key != "random":
                assert a["ops"]["add"][key]["R"] == pytest.approx(res["R"], rel=1e-5), key
    keys = set(fresh["snapshots"][0]["ops"]["add"])
    assert {"gradient/leading/fd_eps=0.005", "update/leading/fd_eps=0.005"} <= keys
    # A second analysis seed: other probes, batch and random directions, the first alignment only.
    other = engine.run(n_long, long_idx, analysis_seed=1, headline_only=True)
    assert set(other["snapshots"][0]["ops"]["add"]) == {"random", "gradient/leading", "update/leading"}
    assert other["snapshots"][-1]["ops"]["add"]["gradient/leading"]["R"] != \
        fresh["snapshots"][-1]["ops"]["add"]["gradient/leading"]["R"]


def test_a_scan_killed_part_way_continues_from_its_saved_responses(run, tmp_path, monkeypatch):
    task, model, store = run
    cfg = ScanConfig(window=3, k=2, n_probes=16, n_random=3, fd_compare=True)
    idx = snapshot_indices(len(store), 4)
    whole = TrajectoryScan(model, task, store, cfg, progress=False).run(len(store), idx)
    path = tmp_path / "responses.pt"
    saves = []
    real_save = TrajectoryScan.save_responses

    def killed_after_two(self):
        real_save(self)
        saves.append(1)
        if len(saves) == 2:
            raise KeyboardInterrupt  # killed after its second measured snapshot

    monkeypatch.setattr(TrajectoryScan, "save_responses", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        TrajectoryScan(model, task, store, cfg, progress=False, responses=path).run(len(store), idx)
    monkeypatch.setattr(TrajectoryScan, "save_responses", real_save)
    again = TrajectoryScan(model, task, store, cfg, progress=False, responses=path)
    assert again.restored > 0
    resumed = again.run(len(store), idx)
    fresh_dirs = TrajectoryScan(model, task, store, cfg, progress=False)
    fresh_dirs.run(len(store), idx)
    # only the two snapshots it had not measured are measured again, and every number is the uninterrupted one
    assert sum(again.measured_directions.values()) < sum(fresh_dirs.measured_directions.values())
    assert resumed["snapshots"] == whole["snapshots"] and resumed["summary"] == whole["summary"]
    # a cache written for another configuration, or a damaged file, is a miss, never an error
    assert TrajectoryScan(model, task, store, ScanConfig(window=3, k=1, n_probes=16, n_random=3),
                          progress=False, responses=path).restored == 0
    path.write_bytes(b"not a torch file")
    assert TrajectoryScan(model, task, store, cfg, progress=False, responses=path).restored == 0


def test_an_interrupted_coupling_cell_resumes_training_and_scan_with_the_same_numbers(tmp_path, monkeypatch):
    from sed_lens.grid import Cell, execute_cell

    config = {"grokking": {"p": 7, "ops": ["add"], "seed": 3, "wandb_mode": "disabled", "sed": [],
                           "train": {"steps": 40, "eval_every": 10, "checkpoint_every": 10, "stop_patience": 0}},
              "scan": {"window": 2, "k": 1, "n_probes": 8, "n_random": 3, "n_snapshots": 4, "analysis_seeds": 2},
              "every": 4, "artifacts": True}

    grid_cell = Cell("add-s3", "sed_lens.experiments.coupling:coupling_cell", config)
    whole = execute_cell(grid_cell, str(tmp_path / "whole"))
    cut = tmp_path / "cut"
    real_take = SnapshotStore.take

    def killed_at_step_24(self, trainer):
        if trainer.step == 24:
            raise KeyboardInterrupt
        real_take(self, trainer)

    monkeypatch.setattr(SnapshotStore, "take", killed_at_step_24)
    with pytest.raises(KeyboardInterrupt):
        execute_cell(grid_cell, str(cut))
    monkeypatch.setattr(SnapshotStore, "take", real_take)
    assert (cut / "checkpoints" / "last.pt").is_file() and not (cut / "cell.json").exists()
    real_save = TrajectoryScan.save_responses

    def killed_in_the_scan(self):
        real_save(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(TrajectoryScan, "save_responses", killed_in_the_scan)
    with pytest.raises(KeyboardInterrupt):
        execute_cell(grid_cell, str(cut))  # training resumes from step 20 and finishes; the scan is killed
    monkeypatch.setattr(TrajectoryScan, "save_responses", real_save)
    assert (cut / "responses.pt").is_file() and (cut / "snapshots").is_dir()
    resumed = execute_cell(grid_cell, str(cut))

    def numbers(summary):
        out = {k: v for k, v in summary.items() if k != "timings"}
        out["train"] = {k: v for k, v in out["train"].items() if k not in ("wall_time_s", "timings")}
        return out

    assert numbers(resumed) == numbers(whole)
    assert len(json.loads((cut / "run.json").read_text())["resumes"]) == 2  # continued, not started over
    steps = [json.loads(line)["step"] for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # no eval logged twice
    measured = resumed["timings"]["measured_directions"]
    assert sum(measured.values()) < sum(whole["timings"]["measured_directions"].values())  # the scan went on
    assert not (cut / "snapshots").exists() and not (cut / "responses.pt").exists()  # only a cut run needs them
    assert len(list((cut / "artifacts").glob("snapshot_*.pt"))) == 4
