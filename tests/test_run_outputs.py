"""What a grokking run shows and leaves behind: SED on by default, the final coupling printed, plotted and saved,
the figures' layout, and ``load_run`` / ``LoadedRun.figures`` reading a run directory back."""

import json
import sys

import pytest
import torch

from sed_lens import load_run, plots, task_logits
from sed_lens.analysis.coupling import centroid_response
from sed_lens.cli import config_from_args, parser_for
from sed_lens.errors import SedLensError
from sed_lens.experiments import grokking
from sed_lens.experiments.grokking import GrokkingConfig
from sed_lens.subspace import ParamSubspace

FLAGS = ["--p", "11", "--init", "tl", "--steps", "40", "--eval-every", "10", "--sed-every", "10", "--sed-window", "3",
         "--snapshot-every", "20", "--wandb-mode", "disabled", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("run") / "r"
    out = tmp_path_factory.mktemp("out") / "stdout.txt"
    saved = sys.stdout
    with open(out, "w") as f:
        sys.stdout = f
        try:
            grokking.main([*FLAGS, "--run-dir", str(d)])
        finally:
            sys.stdout = saved
    return d, out.read_text()


def parse(*argv):
    return config_from_args(GrokkingConfig, parser_for(GrokkingConfig, "grokking", "").parse_args(list(argv)))


def test_sed_is_on_by_default_and_none_turns_it_off():
    assert parse().sed == ("update", "gradient")
    assert parse("--sed", "none").sed == ()
    assert parse("--sed", "").sed == ()
    assert parse("--sed", "update,task_gradient").sed == ("update", "task_gradient")
    assert parse("--device", "cpu").device == "cpu" and parse().device == "auto"


def test_the_run_prints_saves_and_plots_the_final_coupling(run):
    d, printed = run
    final = json.loads((d / "summary.json").read_text())["final_coupling"]
    assert set(final["ops"]["add"]) >= {"update", "gradient"} and final["method"] == "hvp" and final["n_random"] == 20
    g, u = final["ops"]["add"]["gradient"], final["ops"]["add"]["update"]
    assert final["gradient_update_ratio"]["add"] == pytest.approx(g["R_mean"] / u["R_mean"])
    for line in ("final coupling at step 40", "update SED", "gradient SED", "gradient / update R̄ =", "σ_1..σ_4"):
        assert line in printed
    assert f"R̄ = {g['R_mean']:7.2f}" in printed
    assert all((d / f).is_file() for f in ("grokking.png", "sed_spectra.png", "coupling.png"))


def test_final_coupling_matches_an_independent_computation(run):
    """R_j = A(v_j) / median A(r), recomputed from the saved bases, the last checkpoint and 20 random directions."""
    d, _ = run
    loaded = load_run(d)
    final = loaded.summary["final_coupling"]
    model, task = loaded.model, loaded.task
    S = ParamSubspace.attention(model)
    probes = task.probes(final["n_probes"], final["probe_seed"])
    g = torch.Generator().manual_seed(final["random_seed"])
    r = torch.randn(20, S.dim, generator=g)
    r = r / r.norm(dim=1, keepdim=True)
    A_rand = centroid_response(model, S, r, probes, method="jvp")
    for stream in ("update", "gradient"):
        v = loaded.sed_bases["bases"][stream]["directions"]
        A = centroid_response(model, S, v, probes, method="jvp")
        torch.testing.assert_close(A / A_rand.sort().values[9], torch.tensor(final["ops"]["add"][stream]["R"]),
                                   rtol=2e-3, atol=1e-6)


def test_load_run_rebuilds_config_task_model_snapshots_and_metrics(run):
    d, _ = run
    r = load_run(d)
    assert isinstance(r.config, GrokkingConfig) and r.config.p == 11 and r.config.train.steps == 40
    assert r.task.p == 11 and r.task.ops == ("add",)
    state = torch.load(d / "checkpoints" / "last.pt", weights_only=True)["model"]
    for k, v in r.model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    assert r.snapshot_steps == [0, 20, 40]
    snap = torch.load(d / "snapshots" / "step_000020.pt", weights_only=True)
    torch.testing.assert_close(r.model_at(20).state_dict()["blocks.0.attn.W_Q"], snap["blocks.0.attn.W_Q"], rtol=0, atol=0)
    with pytest.raises(SedLensError, match="no snapshot at step 15 .*saved steps: 0, 20, 40"):
        r.model_at(15)
    assert [m["step"] for m in r.metrics] == [0, 10, 20, 30, 40]
    frame = r.metrics_frame()
    assert list(frame.index) == [0, 10, 20, 30, 40] and "test/acc/add" in frame and "sed/gradient/sigma_1" in frame
    assert set(r.sed_bases["bases"]) == {"update", "gradient"}
    assert r.summary["steps"] == 40
    # the model predicts what the run measured
    tokens, labels = r.task.train
    acc = (task_logits(r.model, tokens)["add"].argmax(-1) == labels["add"]).float().mean().item()
    assert acc == pytest.approx(r.metrics[-1]["train/acc/add"], abs=1e-6)


def test_load_run_errors(run, tmp_path, monkeypatch):
    d, _ = run
    with pytest.raises(SedLensError, match="does not exist"):
        load_run(tmp_path / "nope")
    with pytest.raises(SedLensError, match="no config.json"):
        load_run(tmp_path)
    (tmp_path / "f").write_text("x")
    with pytest.raises(SedLensError, match="is a file"):
        load_run(tmp_path / "f")
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(SedLensError, match="needs pandas"):
        load_run(d).metrics_frame()


def test_model_at_without_snapshots_says_how_to_get_them(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"experiment": "grokking", "p": 11}))
    with pytest.raises(SedLensError, match="saved no snapshots; train with --snapshot-every"):
        load_run(tmp_path).model_at(0)
    with pytest.raises(SedLensError, match="has no checkpoint"):
        _ = load_run(tmp_path).model


def _texts(fig):
    fig.canvas.draw()
    return [t.get_text() for ax in fig.axes for t in [*ax.get_xticklabels(which="both"), *ax.get_yticklabels(which="both")]]


def test_plot_run_figures_layout(run):
    d, _ = run
    figs = load_run(d).figures()
    assert set(figs) == {"grokking", "sed_spectra", "coupling"}
    for fig in figs.values():
        texts = _texts(fig)
        assert not any("×" in t or "10^" in t or "mathdefault" in t for t in texts), texts
    acc, loss = figs["grokking"].axes
    assert loss.get_yscale() == "log"
    assert loss.get_ylabel() == "cross-entropy loss" and len(loss.get_lines()) >= 2
    # the legend sits outside the accuracy panel, so it cannot cover the grok-step label or the curves
    renderer = figs["grokking"].canvas.get_renderer()
    assert acc.get_legend().get_window_extent(renderer).x0 >= acc.get_window_extent(renderer).x1
    title = figs["sed_spectra"].get_suptitle()
    assert "W = 3" in title and "k = 3" in title
    for ax in figs["sed_spectra"].axes:
        leg = ax.get_legend()
        if leg is not None:
            assert leg.get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1 - 1
    assert figs["coupling"].axes[0].get_yscale() == "log"
    log = load_run(d).figures(log_steps=True)["grokking"]
    assert log.axes[1].get_xscale() == "log"
    assert min(min(line.get_xdata()) for line in log.axes[0].get_lines() if len(line.get_xdata()) > 2) > 0


def test_grokking_figure_marks_the_grok_step_on_both_panels():
    history = [{"step": s, "train/acc/add": min(1, s / 20), "test/acc/add": 0.0 if s < 30 else 1.0,
                "train/loss/add": 2.0 / (s + 1), "test/loss/add": 2.0 if s < 30 else 0.1} for s in range(0, 60, 10)]
    fig = plots.grokking_figure(history, ["add"], {"add": 30})
    for ax in fig.axes:
        assert any(list(line.get_xdata()) == [30, 30] for line in ax.get_lines())
    assert any(t.get_text() == "grok 30" for t in fig.axes[0].texts)
