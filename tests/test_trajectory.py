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


# --- the per-op variant of a multitask scan (the author's conventions) --------------------------------------------
PER_OP_CFG = dict(n_snapshots=3, window=2, k=2, n_probes=48, n_random=3, grad_batch_size=64, analysis_seeds=1)


@pytest.fixture(scope="module")
def multitask_run(tmp_path_factory):
    """A tiny multitask run (p 11, add and mul) scanned with and without the per-op variant (artifacts kept)."""
    task = ModularArithmetic(p=11, ops=("add", "mul"), seed=0)
    model = build_model("xu2026", task, seed=0)
    store = SnapshotStore(every=4)
    Trainer(model, task, TrainConfig(steps=24, eval_every=8, checkpoint_every=0), [store], progress=False).fit()
    idx = snapshot_indices(len(store), PER_OP_CFG["n_snapshots"])
    art = tmp_path_factory.mktemp("per_op_artifacts")
    on = TrajectoryScan(model, task, store, ScanConfig(**PER_OP_CFG, per_op_inputs=True), progress=False)
    with_variant = on.run(len(store), idx, artifacts=art)
    without = TrajectoryScan(model, task, store, ScanConfig(**PER_OP_CFG), progress=False).run(len(store), idx)
    return task, store, on, with_variant, without, art


def own_draw_seed(base, op):
    """The per-op seed as the docs state it: (base · 1_000_003 + crc32(op)) mod 2³²."""
    import zlib

    return (base * 1_000_003 + zlib.crc32(op.encode())) % 2**32


def flat_grad(model, loss, S):
    """d loss / d (attention weights) by torch.autograd.grad, in the subspace's parameter order (all heads)."""
    params = dict(model.named_parameters())
    grads = torch.autograd.grad(loss, [params[s["name"]] for s in S.describe()])
    return torch.cat([g.reshape(-1) for g in grads])


def test_the_per_op_variant_draws_each_ops_inputs_as_a_single_op_task_would(multitask_run):
    task, store, engine, out, _, art = multitask_run
    stored = torch.load(art / f"snapshot_{out['snapshots'][0]['step']:06d}.pt", weights_only=True)
    probes = stored["per_op_probes"]
    n = PER_OP_CFG["n_probes"]
    mul, add = probes["mul"]["tokens"], probes["add"]["tokens"]
    assert mul.shape == add.shape == (n, 2)
    assert int(mul.min()) >= 1  # mul: pairs from 1..p-1, as the multitask grid
    assert bool((add == 0).any())  # add: pairs from the whole 0..p-1 grid, as a single-op add task draws them
    assert int(stored["probes"]["tokens"].min()) >= 1  # the standard probes: the multitask grid, 1..p-1 for every op
    assert len({tuple(r) for r in add.tolist()}) == n  # distinct pairs
    a, b = add[:, 0], add[:, 1]
    assert torch.equal(probes["add"]["labels"]["add"], (a + b) % 11)
    assert torch.equal(probes["mul"]["labels"]["mul"], (mul[:, 0] * mul[:, 1]) % 11)
    # the probes of a single-op task of that op, with the seed the docs give
    for op in ("add", "mul"):
        single = ModularArithmetic(p=11, ops=(op,), seed=0)
        want = single.probes(n, own_draw_seed(0, op))[0]
        assert torch.equal(probes[op]["tokens"], want), op
    # each op's own gradient batch: grad_batch_size pairs of its single-op grid by RandomState(seed)
    for op, has_zero in (("add", True), ("mul", False)):
        tokens, labels = engine.op_inputs(0)[op].batch
        single = ModularArithmetic(p=11, ops=(op,), seed=0)
        pick = np.random.RandomState(own_draw_seed(0, op)).randint(0, len(single.tokens), size=PER_OP_CFG["grad_batch_size"])
        assert torch.equal(tokens, single.tokens[torch.from_numpy(pick)]) and set(labels) == {op}
        assert bool((tokens == 0).any()) == has_zero


def test_the_per_op_task_gradient_is_a_backward_pass_of_that_ops_loss_on_its_own_batch(multitask_run):
    task, store, engine, _, _, _ = multitask_run
    model = build_model("xu2026", task, seed=0)
    S = ParamSubspace.attention(model)
    streams = engine.per_op_streams(0)
    states = [state for _, state in store]
    for t in (1, len(states) - 1):
        model.load_state_dict(states[t])
        for op in ("add", "mul"):
            single = ModularArithmetic(p=11, ops=(op,), seed=0)
            pick = np.random.RandomState(own_draw_seed(0, op)).randint(0, len(single.tokens),
                                                                       size=PER_OP_CFG["grad_batch_size"])
            tokens = single.tokens[torch.from_numpy(pick)]
            loss = op_losses(model, tokens, {op: single.labels[op][torch.from_numpy(pick)]})[op]
            want = flat_grad(model, loss, S)
            assert want.shape == (S.dim,)
            torch.testing.assert_close(streams[op][t], want, rtol=1e-5, atol=1e-7)
            # not the standard per-op gradient, which is on the batch shared by every op
            assert not torch.allclose(engine.streams(0)[f"task_gradient/{op}"][t], want, rtol=1e-3, atol=1e-6)


def test_the_per_op_R_is_the_coupling_of_those_directions_on_those_probes(multitask_run):
    from sed_lens.analysis.coupling import coupling

    task, store, engine, out, _, art = multitask_run
    model = build_model("xu2026", task, seed=0)
    S = ParamSubspace.attention(model)
    states = [state for _, state in store]
    W, k, n = PER_OP_CFG["window"], PER_OP_CFG["k"], len(states)
    # the per-op gradient stream of mul, computed here by plain autograd on mul's own batch
    single = ModularArithmetic(p=11, ops=("mul",), seed=0)
    pick = torch.from_numpy(np.random.RandomState(own_draw_seed(0, "mul")).randint(
        0, len(single.tokens), size=PER_OP_CFG["grad_batch_size"]))
    grads = []
    for state in states:
        model.load_state_dict(state)
        grads.append(flat_grad(model, op_losses(model, single.tokens[pick], {"mul": single.labels["mul"][pick]})["mul"], S))
    for row in out["snapshots"]:
        t = row["index"]
        model.load_state_dict(states[t])
        stored = torch.load(art / f"snapshot_{row['step']:06d}.pt", weights_only=True)
        lo, hi = window_bounds(t, n, W, "leading")
        vt = np.linalg.svd(torch.stack(grads[lo:hi]).double().numpy(), full_matrices=False)[2][:k]
        dirs = torch.from_numpy(vt).float()
        got = stored["directions"]["task_gradient/mul/leading/per_op"].double().numpy()
        r = min(k, hi - lo)
        assert np.all(np.abs((got[:r] * vt[:r]).sum(1)) > 1 - 1e-4), t
        rand = S.random_directions(PER_OP_CFG["n_random"], torch.Generator().manual_seed(row["random_seed"]))
        probes = single.probes(PER_OP_CFG["n_probes"], own_draw_seed(0, "mul"))
        want = coupling(model, S, dirs[:r], probes, random_directions=rand, method="hvp", task="mul")
        res = row["ops"]["mul"]["task_gradient/mul/leading/per_op"]
        np.testing.assert_allclose(res["R"][:r], want.R.numpy(), rtol=2e-3)
        assert res["median_random"] == pytest.approx(float(want.A_random.median()), rel=1e-4)
        # update SED: the standard directions, measured on add's own probes (with 0 operands)
        if "update/leading/per_op" in row["ops"]["add"]:
            upd = stored["directions"]["update/leading"]
            add_probes = ModularArithmetic(p=11, ops=("add",), seed=0).probes(PER_OP_CFG["n_probes"], own_draw_seed(0, "add"))
            want_u = coupling(model, S, upd, add_probes, random_directions=rand, method="hvp", task="add")
            np.testing.assert_allclose(row["ops"]["add"]["update/leading/per_op"]["R"], want_u.R.numpy(), rtol=1e-4)
    # every R the artifact holds is recomputed from it alone, the per-op keys on their own probes
    for row in out["snapshots"]:
        again = recompute_artifact(art / f"snapshot_{row['step']:06d}.pt")
        assert "task_gradient/mul/leading/per_op" in again["mul"] and "gradient/leading/per_op" in again["add"]
        for op, by_key in again.items():
            for key, R in by_key.items():
                np.testing.assert_allclose(R, row["ops"][op][key]["R"], rtol=1e-4)


def test_the_per_op_variant_leaves_the_standard_keys_as_they_were(multitask_run, tmp_path):
    task, store, engine, on, off, _ = multitask_run
    variant = {"update/leading/per_op", "gradient/leading/per_op"}
    assert set(on["summary"]["add"]) == set(off["summary"]["add"]) | variant | {"task_gradient/add/leading/per_op"}
    assert set(on["summary"]["mul"]) == set(off["summary"]["mul"]) | variant | {"task_gradient/mul/leading/per_op"}
    for a, b in zip(on["snapshots"], off["snapshots"], strict=True):
        for op in task.ops:
            assert {k: v for k, v in a["ops"][op].items() if not k.endswith("/per_op")} == b["ops"][op]
    for op in task.ops:
        assert {k: v for k, v in on["summary"][op].items() if not k.endswith("/per_op")} == off["summary"][op]
    # the compact scan (cell.json) keeps the variant's own random medians, and nothing new without it
    compact_on, compact_off = coupling_exp.compact_scan(on), coupling_exp.compact_scan(off)
    assert "random_median_per_op_inputs" not in compact_off and compact_on["random_median"] == compact_off["random_median"]
    assert compact_on["random_median_per_op_inputs"]["mul"] == [
        r["ops"]["mul"]["task_gradient/mul/leading/per_op"]["median_random"] for r in on["snapshots"]]
    # the option off writes the config (and the cache fingerprint) of a scan from before it existed
    assert "per_op_inputs" not in ScanConfig(**PER_OP_CFG).to_dict()
    assert ScanConfig(**PER_OP_CFG, per_op_inputs=True).to_dict()["per_op_inputs"] is True
    # a single-task scan with the option measures no variant
    single = ModularArithmetic(p=11, ops=("add",), seed=0)
    model = build_model("xu2026", single, seed=0)
    assert not TrajectoryScan(model, single, store, ScanConfig(**PER_OP_CFG, per_op_inputs=True), progress=False).per_op


def test_the_per_op_responses_resume_from_the_cache_on_disk(multitask_run, tmp_path):
    task, store, _, on, _, _ = multitask_run
    cfg = ScanConfig(**PER_OP_CFG, per_op_inputs=True)
    model = build_model("xu2026", task, seed=0)
    idx = snapshot_indices(len(store), PER_OP_CFG["n_snapshots"])
    path = tmp_path / "responses.pt"
    first = TrajectoryScan(model, task, store, cfg, progress=False, responses=path)
    assert first.run(len(store), idx)["snapshots"] == on["snapshots"]
    again = TrajectoryScan(model, task, store, cfg, progress=False, responses=path)
    assert again.restored > 0 and again.run(len(store), idx)["snapshots"] == on["snapshots"]
    # every response, the per-op ones included, came from the file: the counts are the first attempt's alone
    assert again.measured_directions == first.measured_directions
    # the standard scan of the same trajectory does not take the variant's cache for its own
    assert TrajectoryScan(model, task, store, ScanConfig(**PER_OP_CFG), progress=False, responses=path).restored == 0


def test_the_multitask_table_shows_the_per_op_reading_beside_the_standard_one(multitask_run):
    from sed_lens.rendering import fixed

    _, _, _, on, off, _ = multitask_run
    cfg = coupling_exp.CouplingConfig(multitask=True, multitask_ops=("add", "mul"), wandb_mode="disabled")
    train = {"grok_step": {"add": 16, "mul": None}}
    blocks, agg = coupling_exp.table_blocks(cfg, {"multitask-s0": {"coupling": on["summary"], "train": train}})
    rows = {(r[1], r[3]): r for r in blocks[-1].rows}
    assert set(rows) == {(op, reading) for op in ("add", "mul") for reading in ("standard", "per-op inputs")}
    for op in ("add", "mul"):
        s = on["summary"][op]
        for reading, suffix in (("standard", ""), ("per-op inputs", "/per_op")):
            r = rows[(op, reading)]
            assert r[4] == fixed(s[f"update/leading{suffix}"]["peak_R_mean"], 2)
            assert r[6] == fixed(s[f"gradient/leading{suffix}"]["peak_R_mean"], 2)
            assert r[7] == fixed(s[f"task_gradient/{op}/leading{suffix}"]["peak_R_mean"], 2)
            assert "≤ 1" in r[8]
        assert agg["multitask"][op][0]["per_op_inputs"]["per_op_peak"] == s[f"task_gradient/{op}/leading/per_op"]["peak_R_mean"]
    assert "31.5" in rows[("add", "per-op inputs")][8] and "23.8" in rows[("mul", "standard")][8]
    table = coupling_exp.aggregate_tables(agg)["multitask"]
    assert "per_op_inputs/update_peak_R_mean" in table[0] and all(r[5] is not None for r in table[1])
    # a run without the variant: the standard reading only
    blocks, agg = coupling_exp.table_blocks(cfg, {"multitask-s0": {"coupling": off["summary"], "train": train}})
    assert {r[3] for r in blocks[-1].rows} == {"standard"} and "per_op_inputs" not in agg["multitask"]["add"][0]


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
    # only the two snapshots it had not measured are measured again (the counts of the first attempt carry over,
    # so the total is the uninterrupted scan's), and every number is the uninterrupted one
    assert again.measured_directions == fresh_dirs.measured_directions and again.elapsed_before > 0
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
    # the work of every attempt is counted once: the directions measured add up to the uninterrupted cell's
    assert resumed["timings"]["measured_directions"] == whole["timings"]["measured_directions"]
    assert resumed["timings"]["train"] > 0 and resumed["timings"]["scan"] > 0
    assert resumed["train"]["timings"]["eval"] > 0  # the trainer's own timings survive its checkpoints
    assert not (cut / "snapshots").exists() and not (cut / "responses.pt").exists()  # only a cut run needs them
    assert len(list((cut / "artifacts").glob("snapshot_*.pt"))) == 4


def test_headline_bases_are_the_measured_bases_at_each_keys_peak_and_final(multitask_run, tmp_path):
    """bases_at="headline" keeps only what save_bases reads, and the scan's numbers do not depend on it."""
    from sed_lens.analysis.trajectory import save_bases
    from sed_lens.serialization import load

    task, store, _, _, _, _ = multitask_run
    model = build_model("xu2026", task, seed=0)
    cfg = ScanConfig(**PER_OP_CFG, per_op_inputs=True, ablation_windows=(1, 2))
    idx = snapshot_indices(len(store), PER_OP_CFG["n_snapshots"])
    every, headline = {}, {}
    engine = TrajectoryScan(model, task, store, cfg, progress=False)
    a = engine.run(len(store), idx, bases_out=every)
    b = engine.run(len(store), idx, bases_out=headline, bases_at="headline")
    fresh = TrajectoryScan(model, task, store, cfg, progress=False).run(len(store), idx, bases_at="headline")
    assert a["snapshots"] == b["snapshots"] == fresh["snapshots"] and a["summary"] == b["summary"]
    assert "task_gradient/mul/leading/per_op" in headline and "gradient/leading/window=1" not in headline
    for key, by_step in headline.items():
        wanted = {s[f] for s in (a["summary"][op].get(key) for op in task.ops) if s for f in ("peak_step", "final_step")}
        assert set(by_step) == wanted, key
        for step, d in by_step.items():
            assert torch.equal(d, every[key][step]), (key, step)
    saved = [load(save_bases(tmp_path / f"{name}.pt", bases, a["summary"], ParamSubspace.attention(model), cfg))
             for name, bases in (("every", every), ("headline", headline))]
    assert saved[0]["selected"] == saved[1]["selected"]
    assert all(torch.equal(saved[0]["bases"][k][s], d) for k, by in saved[1]["bases"].items() for s, d in by.items())
    assert {k: set(v) for k, v in saved[0]["bases"].items()} == {k: set(v) for k, v in saved[1]["bases"].items()}
    with pytest.raises(SedLensError, match="bases_at must be"):
        engine.run(len(store), idx, bases_at="peaks")


def test_a_peaks_only_cell_keeps_the_artifacts_of_its_reported_values_and_matches_kept_runs(tmp_path):
    from sed_lens.analysis.trajectory import headline_steps
    from sed_lens.experiments.grokking import TRACKING_KEYS
    from sed_lens.grid import Cell, execute_cell, same_config

    config = {"grokking": {"p": 7, "ops": ["add"], "seed": 3, "wandb_mode": "disabled", "sed": [],
                           "train": {"steps": 40, "eval_every": 10, "checkpoint_every": 0, "stop_patience": 0}},
              "scan": {"window": 2, "k": 1, "n_probes": 8, "n_random": 3, "n_snapshots": 8},
              "every": 4, "artifacts": True, "artifacts_at": "peaks"}
    summary = execute_cell(Cell("add-s3", "sed_lens.experiments.coupling:coupling_cell", config), str(tmp_path))
    kept = sorted(int(p.stem.split("_")[1]) for p in (tmp_path / "artifacts").glob("snapshot_*.pt"))
    wanted = headline_steps(summary["coupling"])
    assert kept == sorted(wanted) and 0 < len(kept) < len(summary["measured"])
    s = summary["coupling"]["add"]["gradient/leading"]
    assert {s["peak_step"], s["peak_R1_step"], s["final_step"]} <= set(kept)
    for step in kept:  # each kept artifact still recomputes its reported R
        got = recompute_artifact(tmp_path / "artifacts" / f"snapshot_{step:06d}.pt")["add"]["gradient/leading"]
        row = next(r for r in json.loads((tmp_path / "coupling.json").read_text())["snapshots"] if r["step"] == step)
        assert got == pytest.approx(row["ops"]["add"]["gradient/leading"]["R"], rel=1e-4)
    # which artifacts a run keeps is not what it computes: a run kept before the option existed still matches
    old = {k: v for k, v in config.items() if k != "artifacts_at"}
    assert same_config(old, config, TRACKING_KEYS) and not same_config(old, {**config, "every": 5}, TRACKING_KEYS)


def test_streams_on_disk_give_the_same_scan_and_are_deleted_with_their_seed(multitask_run, tmp_path):
    task, store, _, with_variant, _, _ = multitask_run
    model = build_model("xu2026", task, seed=0)
    idx = snapshot_indices(len(store), PER_OP_CFG["n_snapshots"])
    engine = TrajectoryScan(model, task, store, ScanConfig(**PER_OP_CFG, per_op_inputs=True), progress=False,
                            streams=tmp_path / "streams")
    out = engine.run(len(store), idx)
    assert out["snapshots"] == with_variant["snapshots"]
    files = {p.name for p in (tmp_path / "streams").iterdir()}
    assert {"seed0-update.bin", "seed0-gradient.bin", "seed0-task_gradient-mul.bin", "seed0-per_op-add.bin"} <= files
    engine.drop_streams(0)
    assert {p.name for p in (tmp_path / "streams").iterdir()} == {"seed0-update.bin"}  # shared by every seed
    assert engine.run(len(store), idx)["snapshots"] == with_variant["snapshots"]  # recomputed, same numbers


def test_live_streams_give_the_same_multitask_scan_and_store_nothing(multitask_run, tmp_path):
    task, store, _, with_variant, _, _ = multitask_run
    model = build_model("xu2026", task, seed=0)
    idx = snapshot_indices(len(store), PER_OP_CFG["n_snapshots"])
    engine = TrajectoryScan(model, task, store, ScanConfig(**PER_OP_CFG, per_op_inputs=True), progress=False,
                            streams="live")
    out = engine.run(len(store), idx, artifacts=tmp_path / "art")
    assert out["snapshots"] == with_variant["snapshots"]
    assert engine._streams == {} and engine._per_op_streams == {}  # nothing kept between runs
    assert engine.timings["streams"] > 0 and engine.timings["bases"] > 0
    assert set(engine.stream_names()) == {"update", "gradient", "task_gradient/add", "task_gradient/mul",
                                          "per_op/add", "per_op/mul"}


def test_live_streams_give_the_same_bases_and_numbers_with_ablations_and_two_run_lengths(run):
    """Windows longer than the spacing of the measured snapshots (leading and trailing, k = 1 ablations), a shorter
    and a longer run of one trajectory, a second analysis seed: every number and every basis as in memory."""
    task, model, store = run
    cfg = ScanConfig(window=3, k=2, n_probes=16, n_random=3, analysis_seeds=2, fd_compare=True,
                     ablation_windows=(1, 5), ablation_eps=(0.01,))
    short_idx = snapshot_indices(6, 3)
    long_idx = extended_indices(short_idx, len(store))
    results = {}
    for mode in ("memory", "live"):
        engine = TrajectoryScan(model, task, store, cfg, progress=False, streams=mode)
        every, headline = {}, {}
        outs = [engine.run(6, short_idx, bases_out=every), engine.run(len(store), long_idx, bases_out=headline,
                                                                      bases_at="headline"),
                engine.run(len(store), long_idx, analysis_seed=1)]
        results[mode] = (outs, every, headline)
    (mem, mem_every, mem_head), (live, live_every, live_head) = results["memory"], results["live"]
    assert [o["snapshots"] for o in live] == [o["snapshots"] for o in mem]
    assert [o["summary"] for o in live] == [o["summary"] for o in mem]
    assert "gradient/trailing/W=5" in mem_every and set(live_every) == set(mem_every)
    assert all(torch.equal(live_every[k][s], d) for k, by in mem_every.items() for s, d in by.items())
    assert {k: set(v) for k, v in live_head.items()} == {k: set(v) for k, v in mem_head.items()}
    assert all(torch.equal(live_head[k][s], d) for k, by in mem_head.items() for s, d in by.items())


@pytest.mark.parametrize("streams, match", [("", "streams must be 'memory', 'live' or a directory"),
                                            (3, "streams must be 'memory', 'live' or a directory")])
def test_a_bad_streams_mode_is_one_clear_error(run, streams, match):
    task, model, store = run
    with pytest.raises(SedLensError, match=match):
        TrajectoryScan(model, task, store, ScanConfig(), progress=False, streams=streams)


def test_a_peaks_only_scan_never_holds_more_than_its_running_peaks_and_latest_artifact(run, tmp_path, monkeypatch):
    from sed_lens.analysis import trajectory
    from sed_lens.analysis.trajectory import headline_steps

    task, model, store = run
    cfg = ScanConfig(n_snapshots=6, window=3, k=2, n_probes=16, n_random=3)
    on_disk, save = [], trajectory.save_artifact

    def watching(directory, *args, **kwargs):  # what the scan kept before writing each snapshot's artifact
        on_disk.append({int(p.stem.split("_")[1]) for p in directory.glob("snapshot_*.pt")})
        return save(directory, *args, **kwargs)

    monkeypatch.setattr(trajectory, "save_artifact", watching)
    out = scan_coupling(model, task, store, cfg, artifacts=tmp_path / "a", progress=False, artifacts_at="peaks")
    rows = out["snapshots"]
    for i in range(1, len(rows)):
        assert on_disk[i] == headline_steps(summarize(rows[:i], task.ops)), i
    kept = {int(p.stem.split("_")[1]) for p in (tmp_path / "a").glob("snapshot_*.pt")}
    assert kept == headline_steps(out["summary"]) and len(kept) < len(rows)
    every = scan_coupling(model, task, store, cfg, artifacts=tmp_path / "b", progress=False)
    assert every["snapshots"] == rows and len(list((tmp_path / "b").glob("*.pt"))) == len(rows)
    with pytest.raises(SedLensError, match="artifacts_at must be 'measured' or 'peaks'"):
        scan_coupling(model, task, store, cfg, artifacts=tmp_path / "c", progress=False, artifacts_at="peak")
