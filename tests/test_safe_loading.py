"""Every file sed_lens writes loads with ``torch.load(..., weights_only=True)``; files of sed_lens ≤ 0.1.0 (NumPy
values inside) still load, anything else fails with one line; readout and preset survive copies and rebuilds."""

import copy
import fractions
import json
import random
import shutil
import warnings

import numpy as np
import pytest
import torch
from transformer_lens import HookedTransformer

from sed_lens.analysis.trajectory import ScanConfig, recompute_artifact, scan_coupling
from sed_lens.cli import run_cli
from sed_lens.errors import SedLensError
from sed_lens.experiments import coupling as coupling_exp
from sed_lens.experiments import grokking
from sed_lens.experiments.grokking import checkpoint_step
from sed_lens.hooks.capture import GradientCapture
from sed_lens.hooks.interventions import SubspaceProjection
from sed_lens.hooks.snapshots import SnapshotStore
from sed_lens.loading import load_run
from sed_lens.models import (
    PresetInfo,
    build_model,
    get_preset_info,
    get_readout,
    has_readout,
    model_from_spec,
    model_spec,
    task_logits,
)
from sed_lens.serialization import UnsafeFileError
from sed_lens.tasks import ModularArithmetic
from sed_lens.tracking import Run, read_jsonl
from sed_lens.training import CHECKPOINT_FORMAT, TrainConfig, Trainer


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A grokking run (checkpoint, snapshots, live SED bases) and a coupling cell (artifacts, scan bases)."""
    root = tmp_path_factory.mktemp("safe")
    g, c = root / "g", root / "c"
    assert run_cli(grokking.main, ["--p", "7", "--steps", "20", "--eval-every", "10", "--checkpoint-every", "10",
                                   "--sed", "update,gradient", "--sed-every", "2", "--sed-window", "3",
                                   "--snapshot-every", "10", "--run-dir", str(g), "--wandb-mode", "disabled",
                                   "--no-progress"], prog="grokking") == 0
    assert run_cli(coupling_exp.main, ["--p", "7", "--ops", "add", "--seeds", "1", "--steps", "20", "--every", "4",
                                       "--n-snapshots", "2", "--window", "2", "--k", "1", "--n-probes", "8",
                                       "--n-random", "3", "--eval-every", "10", "--out", str(c), "--no-progress",
                                       "--workers", "1", "--wandb-mode", "disabled"]) == 0
    return g, c / "cells" / "add-s1"


def test_every_file_kind_a_run_writes_loads_weights_only(runs):
    g, cell = runs
    files = sorted(g.rglob("*.pt")) + sorted(cell.rglob("*.pt"))
    kinds = {"checkpoint": g / "checkpoints" / "last.pt", "snapshot": g / "snapshots" / "step_000010.pt",
             "sed_bases": g / "sed_bases.pt", "coupling_bases": cell / "sed_bases.pt"}
    assert set(kinds.values()) <= set(files) and any(p.parent.name == "artifacts" for p in files)
    loaded = {p: torch.load(p, map_location="cpu", weights_only=True) for p in files}  # no allow-list needed
    assert loaded[kinds["checkpoint"]]["format"] == CHECKPOINT_FORMAT
    art = next(v for p, v in loaded.items() if p.parent.name == "artifacts")
    assert all(type(v) in (int, float, str, bool, list, type(None)) for v in art["model"]["spec"]["cfg"].values())
    assert art["model"]["spec"]["preset"] == {"preset": "xu2026", "init": "torch", "seed": 1}


def test_checkpoints_with_every_callback_load_weights_only_and_restore_the_rngs(tmp_path, tiny_task):
    def trainer(run):
        model = build_model("xu2026", tiny_task, seed=0)
        cbs = [GradientCapture(window=3, k=1, every=2), SubspaceProjection(k=1, window=3, warmup=2),
               SnapshotStore(every=4)]
        return Trainer(model, tiny_task, TrainConfig(steps=8, eval_every=4, checkpoint_every=0), cbs, run=run,
                       progress=False)

    with Run(tmp_path / "r", {"x": 1}, wandb_mode="disabled") as run:
        t = trainer(run)
        t.fit()
        path = t.save_checkpoint(t.checkpoint_path)
        state = torch.load(path, weights_only=True)
        assert isinstance(state["sampler"]["key"], torch.Tensor)
        expected = t.sampler.get_state(), random.getstate(), t.sampler.rand(3), random.random()
        fresh = trainer(run)
        fresh.load_checkpoint(path)
    assert fresh.step == t.step and checkpoint_step(path) == t.step
    got = fresh.sampler.get_state()
    assert got[0] == expected[0][0] and np.array_equal(got[1], expected[0][1]) and got[2:] == expected[0][2:]
    assert random.getstate() == expected[1]
    assert np.array_equal(fresh.sampler.rand(3), expected[2]) and random.random() == expected[3]


def legacy_checkpoint(path):
    """Rewrite a checkpoint the way sed_lens 0.1.0 wrote it: format /1, NumPy sampler state, tuple RNG state."""
    state = torch.load(path, weights_only=True)
    s = state["sampler"]
    state["sampler"] = (s["bit_generator"], s["key"].numpy().astype(np.uint32), s["pos"], s["has_gauss"], s["gauss"])
    state["python_rng"] = (state["python_rng"][0], tuple(state["python_rng"][1]), state["python_rng"][2])
    state["format"] = "sed_lens.checkpoint/1"
    torch.save(state, path)
    with pytest.raises(Exception, match="Unsupported global"):  # what made weights_only=False necessary
        torch.load(path, weights_only=True)


def test_run_directories_of_the_previous_release_still_load_and_resume(runs, tmp_path):
    g, cell = runs
    new, old = tmp_path / "new", tmp_path / "old"
    shutil.copytree(g, new)
    shutil.copytree(g, old)
    legacy_checkpoint(old / "checkpoints" / "last.pt")
    assert checkpoint_step(old / "checkpoints" / "last.pt") == 20
    for k, v in load_run(new).model.state_dict().items():
        torch.testing.assert_close(load_run(old).model.state_dict()[k], v, rtol=0, atol=0)
    # resuming from the 0.1.0 checkpoint (NumPy sampler state, tuple RNG state) continues bit-identically
    for d in (new, old):
        assert run_cli(grokking.main, ["--resume", str(d), "--steps", "24"], prog="grokking") == 0
    assert rows_without_timing(old / "metrics.jsonl") == rows_without_timing(new / "metrics.jsonl")
    assert torch.load(old / "checkpoints" / "last.pt", weights_only=True)["format"] == CHECKPOINT_FORMAT  # rewritten
    # a 0.1.0 coupling artifact held NumPy scalars in its model config
    art_path = sorted((cell / "artifacts").glob("snapshot_*.pt"))[-1]
    art = torch.load(art_path, weights_only=True)
    art["model"]["spec"]["cfg"]["attn_scale"] = np.float64(art["model"]["spec"]["cfg"]["attn_scale"])
    old_art = tmp_path / "artifacts" / art_path.name
    old_art.parent.mkdir()
    torch.save(art, old_art)
    with pytest.raises(Exception, match="Unsupported global"):
        torch.load(old_art, weights_only=True)
    assert recompute_artifact(old_art) == recompute_artifact(art_path)


def rows_without_timing(path):
    return [{k: v for k, v in r.items() if "time" not in k} for r in read_jsonl(path)]


def test_a_file_holding_other_objects_fails_with_one_line_naming_it_and_its_version(runs, tmp_path):
    g, _ = runs
    d = tmp_path / "g"
    d.mkdir()
    for name in ("config.json", "run.json"):
        (d / name).write_bytes((g / name).read_bytes())
    version = json.loads((d / "run.json").read_text())["sed_lens_version"]
    (d / "checkpoints").mkdir()
    path = d / "checkpoints" / "last.pt"
    torch.save({"format": "sed_lens.checkpoint/1", "step": 3, "model": {}, "x": fractions.Fraction(1, 3)}, path)
    for load in (lambda: load_run(d).model, lambda: checkpoint_step(path)):
        with pytest.raises(UnsafeFileError) as e:
            load()
        msg = str(e.value)
        assert "\n" not in msg and str(path) in msg and f"sed_lens {version}" in msg and "fractions.Fraction" in msg
    assert issubclass(UnsafeFileError, SedLensError)
    # a damaged file is still reported as damaged
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(SedLensError, match="truncated or corrupted"):
        checkpoint_step(path)


def test_readout_and_preset_survive_copies_and_a_rebuild_from_the_spec():
    task = ModularArithmetic(p=7, ops=("add", "mul"), seed=0)
    model = build_model("xu2026", task, seed=3)
    info = PresetInfo("xu2026", "torch", 3)
    assert get_preset_info(model) == info and has_readout(model)
    assert get_readout(copy.deepcopy(model)) == get_readout(model)
    assert get_preset_info(copy.deepcopy(model)) == info
    spec = json.loads(json.dumps(model_spec(model)))  # what model.json and the artifacts hold
    again = model_from_spec(spec, model.state_dict(), device="cpu")
    assert get_readout(again) == get_readout(model) and get_preset_info(again) == info
    tokens = task.test[0][:5]
    for op, logits in task_logits(model, tokens).items():
        torch.testing.assert_close(task_logits(again, tokens)[op], logits)
    # the state dict is TransformerLens' own: a plain HookedTransformer loads it (and has no sed_lens metadata)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = HookedTransformer(model.cfg, move_to_device=False)
    plain.load_state_dict(model.state_dict())
    assert not has_readout(plain) and get_preset_info(plain) is None and get_readout(plain).ops == ("y",)
    assert not hasattr(model, "sed_readout") and not hasattr(model, "sed_preset")


def test_scan_artifacts_rebuild_with_their_readout(tmp_path):
    task = ModularArithmetic(p=7, ops=("add", "mul"), seed=0)
    model = build_model("xu2026", task, seed=0)
    store = SnapshotStore(every=4)
    Trainer(model, task, TrainConfig(steps=8, eval_every=8, checkpoint_every=0), [store], progress=False).fit()
    out = scan_coupling(model, task, store, ScanConfig(n_snapshots=2, window=2, k=1, n_probes=8, n_random=3),
                        artifacts=tmp_path, progress=False)
    row = out["snapshots"][-1]
    again = recompute_artifact(tmp_path / f"snapshot_{row['step']:06d}.pt")
    for op in task.ops:
        for key, R in again[op].items():
            np.testing.assert_allclose(R, row["ops"][op][key]["R"], rtol=1e-4)
